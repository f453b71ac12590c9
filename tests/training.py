"""Helpers of the training tests: a tiny model on synthetic_reid, and the learns-cross-domain check."""
import json

import jax

from jaxreid import parallel, registry
from jaxreid.eval.evaluator import evaluate_matcher
from jaxreid.models import init_variables


def tiny(config, data_dir, width=8, batch_size=16, **train):
  config.dataset.data_dir = data_dir
  config.model.update(depth=18, width=width, neck=32)
  config.data.update(batch_size=batch_size, num_instances=4, num_threads=1)
  config.data.augment.color_jitter = False   # colour is most of the identity cue here
  config.eval.update(batch_size=64, tile_p=64, tile_g=256)
  config.train.update(log_every_steps=5, checkpoint_every_steps=4, **train)
  return config


def untrained_and_trained(config, tmp_path) -> tuple[dict, dict, dict]:
  """(metrics of the untrained model, of the trained one, the training's results) on the one
  test set of `config`."""
  model = registry.build_model(config)
  variables = init_variables(model, jax.random.key(config.seed), 64, 32)
  untrained = evaluate_matcher(config, model, variables, parallel.make_mesh())
  trained = registry.train_and_evaluate(config, tmp_path)
  (u,), (t,) = untrained["test"].values(), trained["test"].values()
  print(json.dumps({"untrained": u, "trained": t}))
  return u, t, trained


def assert_learns_cross_domain(config, tmp_path) -> dict:
  """Trains on domain_a, tests on domain_b: mAP at least twice the untrained model's."""
  u, t, trained = untrained_and_trained(config, tmp_path)
  assert t["mAP"] >= 2 * u["mAP"], (u, t)
  return trained
