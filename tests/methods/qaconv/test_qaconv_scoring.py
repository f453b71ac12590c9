"""Tiled / sharded scoring against untiled QAConv and an independent NumPy QAConv."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid.eval import pairwise_self_scores, score_matrix
from jaxreid.methods.qaconv.model import QAConv

H, W, D = 4, 2, 16
REPO = pathlib.Path(__file__).resolve().parents[3]


def unit_maps(rng, n):
  x = rng.normal(size=(n, H, W, D)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def perturbed_variables(module, seed):
  """Initialised variables moved away from their defaults (BN stats, scales, fc, biases)."""
  rng = np.random.default_rng(seed)
  probe = unit_maps(rng, 2)
  variables = module.init(jax.random.key(seed), probe, probe)

  def perturb(path, x):
    name = path[-1].key
    if name in ("var", "scale"):
      return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
    if name == "kernel":
      return jnp.asarray(rng.normal(size=x.shape) / x.shape[0], x.dtype)
    return jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype)  # mean, bias

  return jax.tree_util.tree_map_with_path(perturb, variables)


def qaconv_numpy(variables, probe, gallery, head):
  """QAConv eval-mode logits from the paper, in float64 NumPy."""
  v = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
  params, stats = v["params"], v["batch_stats"]

  def scalar_bn(x, name):
    return ((x - stats[name]["mean"][0]) / np.sqrt(stats[name]["var"][0] + 1e-5)
            * params[name]["scale"][0] + params[name]["bias"][0])

  p = probe.reshape(len(probe), -1, D).astype(np.float64)
  g = gallery.reshape(len(gallery), -1, D).astype(np.float64)
  sim = np.einsum("ptd,grd->pgtr", p, g)  # [P, G, probe location, gallery location]
  best_for_probe_loc, best_for_gallery_loc = sim.max(axis=3), sim.max(axis=2)
  kernel, bias = params["fc"]["kernel"][:, 0], params["fc"]["bias"][0]
  if head == "v2.1":
    logits = (scalar_bn(best_for_probe_loc, "bn") @ kernel + bias
              + scalar_bn(best_for_gallery_loc, "bn") @ kernel + bias)
  else:
    # Official v1 (QAConv 1.2) order: the gallery-location-indexed half first.
    both = np.concatenate([best_for_gallery_loc, best_for_probe_loc], axis=-1)
    logits = scalar_bn(both, "bn") @ kernel + bias
  return scalar_bn(logits, "logit_bn")


@pytest.fixture(scope="module")
def qaconv():
  module = QAConv(H, W)
  return module, perturbed_variables(module, 0), lambda v, p, g: module.apply(v, p, g)


@pytest.mark.parametrize("head", ["v2.1", "v1"])
def test_flax_qaconv_matches_numpy(head):
  rng = np.random.default_rng(1)
  probe, gallery = unit_maps(rng, 5), unit_maps(rng, 7)
  module = QAConv(H, W, head=head)
  variables = perturbed_variables(module, 2)
  got = np.asarray(module.apply(variables, probe, gallery))
  want = qaconv_numpy(variables, probe, gallery, head)
  assert np.abs(want).max() > 0.5  # the perturbation is not a no-op
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tiled_equals_untiled(qaconv):
  module, variables, match = qaconv
  rng = np.random.default_rng(3)
  probe, gallery = unit_maps(rng, 37), unit_maps(rng, 53)
  got = score_matrix(match, variables, probe, jnp.asarray(gallery), tile_p=16, tile_g=32)
  assert got.dtype == np.float32 and got.shape == (37, 53)
  want = np.asarray(module.apply(variables, probe, gallery))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, qaconv_numpy(variables, probe, gallery, "v2.1"),
                             rtol=1e-5, atol=1e-5)
  again = score_matrix(match, variables, probe, gallery, tile_p=16, tile_g=32, progress=True)
  np.testing.assert_array_equal(again, got)


def test_one_traced_shape_and_no_recompile():
  traced = []

  def dot(v, p, g):
    traced.append((p.shape, g.shape))
    return v * p.reshape(len(p), -1) @ g.reshape(len(g), -1).T

  rng = np.random.default_rng(4)
  probe, gallery = rng.normal(size=(37, 3, 2)), rng.normal(size=(53, 3, 2))
  want = 2.0 * probe.reshape(37, -1) @ gallery.reshape(53, -1).T
  for _ in range(2):
    got = score_matrix(dot, 2.0, probe, gallery, tile_p=16, tile_g=32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert traced == [((16, 3, 2), (32, 3, 2))]
  # Smaller than the tiles: the tile shrinks to the input (one device here).
  np.testing.assert_allclose(score_matrix(dot, 2.0, probe[:3], gallery[:5]), want[:3, :5],
                             rtol=1e-5, atol=1e-5)
  assert traced[-1] == ((3, 3, 2), (5, 3, 2))
  np.testing.assert_allclose(pairwise_self_scores(dot, 2.0, probe[:3]),
                             2.0 * probe[:3].reshape(3, -1) @ probe[:3].reshape(3, -1).T,
                             rtol=1e-5, atol=1e-5)
  assert score_matrix(dot, 2.0, probe[:0], gallery).shape == (0, 53)


def test_mesh_argument():
  dot = lambda v, p, g: p @ g.T
  explicit = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  np.testing.assert_array_equal(score_matrix(dot, None, np.ones((2, 3)), np.ones((4, 3)),
                                             mesh=explicit), np.full((2, 4), 3.0))
  two_axes = jax.make_mesh((1, 1), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with pytest.raises(ValueError, match="one axis"):
    score_matrix(dot, None, np.ones((2, 3)), np.ones((2, 3)), mesh=two_axes)


_MULTI_DEVICE = """
import json, jax, numpy as np
from tests.methods.qaconv.test_qaconv_scoring import QAConv, H, W, perturbed_variables, unit_maps
from jaxreid.eval import score_matrix
assert jax.device_count() == 8, jax.devices()
module = QAConv(H, W)
variables = perturbed_variables(module, 0)
match = lambda v, p, g: module.apply(v, p, g)
rng = np.random.default_rng(5)
probe, gallery = unit_maps(rng, 37), unit_maps(rng, 53)
one = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                    devices=jax.devices()[:1])
single = score_matrix(match, variables, probe, gallery, tile_p=16, tile_g=32, mesh=one)
sharded = score_matrix(match, variables, probe, gallery, tile_p=16, tile_g=32)
small_tile = score_matrix(match, variables, probe, gallery, tile_p=4, tile_g=32)
print(json.dumps({"sharded": float(np.abs(sharded - single).max()),
                  "small_tile": float(np.abs(small_tile - single).max()),
                  "shape": list(sharded.shape)}))
"""


def test_eight_devices_equal_one():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  diffs = json.loads(out.stdout.strip().splitlines()[-1])
  assert diffs["shape"] == [37, 53]
  assert diffs["sharded"] <= 1e-5 and diffs["small_tile"] <= 1e-5, diffs


def test_correspondences_are_the_pooling_argmaxes():
  from jaxreid.methods.qaconv.model import correspondences
  rng = np.random.default_rng(3)
  probe, gallery = unit_maps(rng, 3), unit_maps(rng, 4)
  out = correspondences(probe, gallery)
  for p in range(3):
    for g in range(4):
      sim = probe[p].reshape(-1, D) @ gallery[g].reshape(-1, D).T   # [probe loc, gallery loc]
      np.testing.assert_array_equal(out["probe_to_gallery"][p, g], sim.argmax(1))
      np.testing.assert_array_equal(out["gallery_to_probe"][p, g], sim.argmax(0))
      np.testing.assert_allclose(out["probe_to_gallery_score"][p, g], sim.max(1), atol=1e-5)
