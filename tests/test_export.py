"""jaxreid.export: encode and match as batch-polymorphic StableHLO that a loader runs without the
model code, equal to the model's own outputs."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxreid.api import ReidModel
from jaxreid.export import export_model, load_exported
from jaxreid.models import init_variables
from jaxreid.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


def _tiny(name):
  """A tiny model of configs/<name>.py with random variables (shapes from init, values drawn
  here: compiling an init takes longer than the test)."""
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config()
  config.model.update(depth=18, width=8, neck=16)
  module = build_model(config)
  shapes = jax.eval_shape(lambda: init_variables(module, jax.random.key(0), config.data.height,
                                                 config.data.width))
  return ReidModel(config, random_variables(shapes))


def random_variables(shapes, seed: int = 0):
  """Variables of the given shapes drawn as an initialiser would: He-scaled kernels, BatchNorm
  scales and variances near 1, small biases, means and other parameters."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, noise = str(path[-1].key), rng.normal(size=leaf.shape)
    if name == "kernel" and len(leaf.shape) > 1:
      x = noise * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      x = 1.0 + 0.1 * np.abs(noise)
    else:
      x = 0.1 * noise
    return x.astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


_LOADER = """
import json, sys
import numpy as np
from jaxreid.export import load_exported
served = load_exported(sys.argv[1])
images = np.load(sys.argv[2])
features = served.encode(images)
scores = served.match(features[:2], features)
model_code = sorted(m for m in sys.modules if m.startswith(("jaxreid.methods", "jaxreid.models",
                    "jaxreid.api", "jaxreid.registry", "jaxreid.backbones", "configs")))
print(json.dumps({"features": features.tolist(), "scores": scores.tolist(),
                  "model_code": model_code}))
"""


@pytest.mark.parametrize("name", ["qaconv_gs", "embedding"])   # feature maps; vectors
def test_exported_functions_equal_the_model_for_two_batch_sizes(name, tmp_path):
  model = _tiny(name)
  meta = export_model(model, tmp_path)
  assert meta["feature_shape"] == list(model.feature_shape)
  assert meta["method"] == model.config.model.name
  assert {p.name for p in tmp_path.iterdir()} == {"encode.stablehlo", "match.stablehlo",
                                                  "variables.msgpack", "meta.json"}
  h, w = model.input_size
  images = np.random.default_rng(0).integers(0, 256, (5, h, w, 3), dtype=np.uint8)
  features = model.encode(images)
  scores = model.match(features, features)
  served = load_exported(tmp_path, gallery_tile=3)    # the gallery of 5 in tiles of 3 and 2
  for rows in (slice(0, 2), slice(2, 5)):             # batch sizes 2 and 3
    np.testing.assert_allclose(served.encode(images[rows]), features[rows], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(served.match(features[rows], features), scores[rows],
                               rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(served.match(features[:3], features[3:]), scores[:3, 3:],
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=f"expected images \\[B, {h}, {w}, 3\\]"):
    served.encode(images[:, :-1])

  # A fresh interpreter loads and runs the export without importing any model code.
  np.save(tmp_path.parent / "images.npy", images)
  out = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path),
                        str(tmp_path.parent / "images.npy")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**__import__("os").environ,
                                                    "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["model_code"] == []
  np.testing.assert_allclose(result["features"], features, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(result["scores"], scores[:2], rtol=1e-4, atol=1e-4)


def test_load_exported_names_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="encode.stablehlo, match.stablehlo, "
                     "variables.msgpack, meta.json missing"):
    load_exported(tmp_path)
