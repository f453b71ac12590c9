"""The contract every registered method keeps, run for each entry of `jaxreid.registry.METHODS`
from its config file (configs/<name>.py, shrunk to a tiny model): build and init, `encode` /
`match` shapes, one training step of each of its objectives that lowers nothing to NaN and
moves the parameters, save → `jaxreid.load` of the run giving the same features and scores,
the official-checkpoint converter's round trip (export to the official layout, convert back:
the same variables and architecture) where the method has one, and that no detector claims a
jaxreid run. Registering a method puts it under this test."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreid
from jaxreid import registry
from jaxreid.api import load_config_file
from jaxreid.checkpoint import Checkpointer
from jaxreid.models import init_variables
from jaxreid.train.loop import create_train_state, make_train_step
from jaxreid.train.optim import make_optimizer
from jaxreid.weights import flatten_state

H, W, NUM_CLASSES = 64, 32, 4
# Objectives that need more than the method's default config holds: another variant of its
# model, or a field of the config written for that loss (QAConv's triplet: configs/qaconv_gs.py).
OBJECTIVE_CONFIG = {
    ("kpm", "random_walk"): {"model": dict(variant="released", scales=1, tau=1.0, groups=2)},
    ("qaconv", "triplet"): {"train": dict(triplet_margin=16.0)},
}


def tiny_config(name: str):
  config = load_config_file(f"configs/{name}.py")
  m = config.model
  m.update(depth=18, width=8)
  if m.neck:
    m.neck = 16
  for field, value in (("ffn", 32), ("embed_dim", 16), ("num_classes", NUM_CLASSES)):
    if field in m:
      m[field] = value
  config.data.update(height=H, width=W, batch_size=8)
  config.eval.update(batch_size=8, tile_p=4, tile_g=4)
  return config


def images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=sorted(registry.METHODS))
def method_case(request):
  name = request.param
  method = registry.get(name)
  config = tiny_config(name)
  model = method.build(config)
  variables = init_variables(model, jax.random.key(0), H, W)
  return name, method, config, model, variables


def test_encode_and_match_shapes(method_case):
  name, method, config, model, variables = method_case
  assert registry.method_of(config) is method
  probe = model.apply(variables, images(2, 0), method="encode")
  gallery = model.apply(variables, images(3, 1), method="encode")
  assert probe.shape[1:] == gallery.shape[1:] and probe.shape[0] == 2
  scores = model.apply(variables, probe, gallery, method="match")
  assert scores.shape == (2, 3) and np.isfinite(np.asarray(scores)).all()
  assert method.kind in ("pairwise", "embedding")
  assert (probe.ndim == 2) == (method.kind == "embedding")


def test_one_training_step_per_objective(method_case):
  name, method, config, model, _ = method_case
  assert method.objectives, f"{name} has no objective"
  labels = jnp.asarray(np.repeat(np.arange(NUM_CLASSES), 2), jnp.int32)
  batch = {"image": jnp.asarray(images(8, 2)), "label": labels,
           "index": jnp.arange(8, dtype=jnp.int32)}
  for loss_name, objective in sorted(method.objectives.items()):
    extra = OBJECTIVE_CONFIG.get((name, loss_name), {})
    cfg = config.copy_and_resolve_references()
    cfg.train.loss = loss_name
    with cfg.unlocked():
      for section, fields in extra.items():
        cfg[section].update(fields)
    mdl = method.build(cfg) if "model" in extra else model
    tx = make_optimizer(cfg.train, steps_per_epoch=10)
    state = create_train_state(cfg, mdl, tx, objective, NUM_CLASSES, 8, jax.random.key(0))
    new, metrics = jax.jit(make_train_step(mdl, tx, objective, cfg.train))(state, batch)
    assert np.isfinite(float(metrics["loss"])) and "accuracy" in metrics, (loss_name, metrics)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params,
                                         new.params))
    assert any(moved), f"{name}/{loss_name}: no parameter changed"
    assert int(new.step) == 1


def test_save_then_load_gives_the_same_model(method_case, tmp_path):
  name, method, config, model, variables = method_case
  # Perturb so that a load that silently re-initialised would not match.
  variables = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                           variables)
  objective = next(iter(method.objectives.values()))
  tx = make_optimizer(config.train, steps_per_epoch=10)
  state = create_train_state(config, model, tx, objective, NUM_CLASSES, 8, jax.random.key(0))
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  ckpt = Checkpointer(tmp_path)
  ckpt.save_best(state, config, {"mAP": 1.0})
  ckpt.wait()
  ckpt.close()
  # A method with its own loaded object (NFormer: the stage-2 head) runs on the model named
  # by model.name; its run loads as that model.
  loaded = jaxreid.load(name if method.load is None else config.model.name, tmp_path)
  x, y = images(2, 3), images(3, 4)
  want_p = model.apply(variables, x, method="encode")
  want_g = model.apply(variables, y, method="encode")
  np.testing.assert_allclose(loaded.encode(x), want_p, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loaded.match(want_p, want_g),
                             model.apply(variables, want_p, want_g, method="match"),
                             rtol=1e-4, atol=1e-4)


def test_detectors_claim_only_their_own_official_layout(method_case):
  """No detector claims a jaxreid run's variable names: they look for official key layouts."""
  name, method, config, model, variables = method_case
  keys = list(flatten_state({"model": variables["params"]}))
  assert registry.detect({k: 0 for k in keys}) is None, name


def test_official_converter_round_trip(method_case):
  name, method, config, model, variables = method_case
  if method.convert is None:
    assert method.export is None, f"{name} exports but cannot convert back"
    return
  assert method.export is not None, f"{name} converts official checkpoints but has no export"
  variables = jax.tree.map(lambda x: x + 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                           variables)
  state = method.export(variables)
  assert registry.detect(state) == name
  overrides, converted = method.convert(state, (H, W))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               converted, jax.tree.map(np.asarray, variables))
  for field, value in overrides["model"].items():
    if field in config.model and field != "normalize":
      assert config.model[field] == value, (name, field, config.model[field], value)
  assert (overrides["data"]["height"], overrides["data"]["width"]) == (H, W)
