"""The synthetic default of configs/pat.py (a tiny ViT with part tokens, CSL and PSD) learns on
synthetic_reid: trained on domain_a, its mAP on domain_a's disjoint test ids is at least twice
the untrained model's."""
import json

import jax

from configs import pat
from jaxreid import parallel, registry
from jaxreid.eval.evaluator import evaluate_matcher
from jaxreid.models import init_variables
from training import tiny


def test_tiny_pat_learns(synthetic_data_dir, tmp_path):
  config = tiny(pat.get_config(), synthetic_data_dir, batch_size=32)   # 6 epochs
  assert config.dataset.test == "synthetic_reid/domain_a"
  model = registry.build_model(config)
  variables = init_variables(model, jax.random.key(config.seed), 64, 32)
  untrained = evaluate_matcher(config, model, variables, parallel.make_mesh())
  trained = registry.method_of(config).train_and_evaluate(config, tmp_path)
  (u,), (t,) = untrained["test"].values(), trained["test"].values()
  print(json.dumps({"untrained": u, "trained": t}))
  assert trained["step"] == config.train.epochs * 18 and t["mAP"] >= 2 * u["mAP"], (u, t)
