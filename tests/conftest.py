"""Shared test set-up: CPU only, a persistent XLA cache, one synthetic dataset per session."""
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxreid/xla-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """A data_dir with both synthetic_reid domains built (array_record)."""
  from jaxreid.data import datasets
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for domain in ("domain_a", "domain_b"):
    datasets.load_split("synthetic_reid", "train", data_dir=data_dir, config=domain)
  return data_dir
