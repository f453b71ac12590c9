"""The whole NFormer pipeline on synthetic_reid (stage 1, stage 2, refined evaluation), tiny."""
import json

import jax

from configs import nformer as nformer_config


def test_tiny_nformer_pipeline(synthetic_data_dir, tmp_path):
  """Stage 1 reaches at least twice the untrained mAP; the NFormer refinement raises it."""
  from jaxreid import parallel
  from jaxreid.eval.evaluator import evaluate_matcher
  from jaxreid.models import init_variables
  from jaxreid.registry import build_model, train_and_evaluate
  c = nformer_config.get_config()
  c.dataset.data_dir = synthetic_data_dir
  c.model.update(depth=18, width=16)
  c.data.update(batch_size=32, num_instances=4, num_threads=1)
  c.train.update(epochs=4, lr_step_epochs=(3,), warmup_epochs=1, log_every_steps=5)
  c.nformer.update(epochs=2, ffn=128, lr=3e-4)
  untrained_config = c.copy_and_resolve_references()
  untrained_config.model.num_classes = 150     # training fills it in from the train split
  model = build_model(untrained_config)
  untrained = evaluate_matcher(c, model, init_variables(model, jax.random.key(0), 64, 32),
                               parallel.make_mesh())
  assert c.model.num_classes == 0
  results = train_and_evaluate(c, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["num_classes"] > 0
  (u,), (s1,), (nf,) = (r["test"].values() for r in (untrained, results["stage1"], results))
  print(json.dumps({"untrained": u, "stage1": s1, "nformer": nf, "seconds": results["seconds"]}))
  assert s1["mAP"] >= 2 * u["mAP"], (u, s1)
  assert nf["mAP"] > s1["mAP"], (s1, nf)
  assert (tmp_path / "nformer" / "best").is_dir() and (tmp_path / "results.json").exists()
  import jaxreid
  loaded = jaxreid.load("nformer", tmp_path)
  assert loaded.module.ffn == 128 and loaded.module.dim == c.model.embed_dim
