"""The stage-2 train-feature cache: written whole or not at all; a damaged one is recomputed."""
import jax
import numpy as np

from configs import nformer as nformer_config
from jaxreid import parallel
from jaxreid.methods.nformer import pipeline
from jaxreid.models import init_variables
from jaxreid.registry import build_model


def test_feature_cache_is_atomic_and_a_damaged_one_is_recomputed(synthetic_data_dir, tmp_path):
  c = nformer_config.get_config()
  c.dataset.data_dir = synthetic_data_dir
  c.model.update(depth=18, width=16, num_classes=150)
  c.data.update(height=64, width=32, num_threads=1)
  model = build_model(c)
  variables = init_variables(model, jax.random.key(0), 64, 32)
  mesh = parallel.make_mesh()
  features, labels, _ = pipeline.train_features(c, c.nformer, model, variables, mesh, tmp_path, 7)
  cache = tmp_path / pipeline.STAGE2_DIR / "train_features_7_0.npz"
  assert [p.name for p in cache.parent.iterdir()] == [cache.name]    # no partial file left
  np.testing.assert_array_equal(np.load(cache)["features"], features)
  assert features.shape[0] == len(labels)
  cache.write_bytes(cache.read_bytes()[:200])                         # killed mid-write (old way)
  again, _, _ = pipeline.train_features(c, c.nformer, model, variables, mesh, tmp_path, 7)
  np.testing.assert_array_equal(again, features)
  np.testing.assert_array_equal(np.load(cache)["features"], features)
