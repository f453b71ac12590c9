"""Evaluation of a trained model on each test set: extract once, score in tiles, rank."""
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxreid import parallel
from jaxreid.data import datasets, pipeline
from jaxreid.eval.metrics import evaluate_ranking
from jaxreid.eval.scoring import score_matrix

RANKS = (1, 5, 10, 20)


@functools.lru_cache(maxsize=None)
def _jitted_encode(model, mesh):
  fn = lambda variables, images: model.apply(variables, images, method="encode")
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


@functools.lru_cache(maxsize=None)
def match_fn(model):
  """A stable (cacheable) pure function (variables, probe, gallery) → logits."""
  return lambda variables, p, g: model.apply(variables, p, g, method="match")


def extract(model, variables, split, config, mesh, *, indices=None, desc="extract") -> np.ndarray:
  """Encodes `split` (or its `indices`) in fixed-size batches → host float32 array."""
  batch_size = config.eval.batch_size
  parallel.check_divisible(batch_size, mesh, "eval.batch_size")
  encode = _jitted_encode(model, mesh)
  variables = parallel.replicate(variables, mesh)
  n = len(split) if indices is None else len(indices)
  out = []
  batches = pipeline.eval_batches(split, batch_size=batch_size, height=config.data.height,
                                  width=config.data.width, indices=indices)
  for batch, valid in tqdm(batches, total=-(-n // batch_size), desc=desc, leave=False,
                           dynamic_ncols=True):
    maps = encode(variables, jax.device_put(batch["image"], parallel.batch_sharded(mesh)))
    out.append(np.asarray(jax.device_get(maps))[:valid])
  return np.concatenate(out)


def ranking_summary(metrics: dict) -> dict:
  """R1/5/10/20, mAP, mINP in percent."""
  cmc = metrics["cmc"]
  out = {f"R{r}": round(100 * float(cmc[r - 1]), 2) for r in RANKS if r <= len(cmc)}
  out.update(mAP=round(100 * float(metrics["mAP"]), 2), mINP=round(100 * float(metrics["mINP"]), 2),
             num_queries=int(metrics["num_valid_queries"]))
  return out


def evaluate_matcher(config, model, variables, mesh) -> dict:
  """Results of every test set in `config.dataset.test`, each reported separately."""
  data_dir = config.dataset.data_dir
  results = {"test": {}, "paper": dict(config.eval.get("paper", {}))}
  for name, test_config in datasets.parse_specs(config.dataset.test):
    t0 = time.time()
    query = datasets.load_split(name, "query", data_dir=data_dir, config=test_config)
    gallery = datasets.load_split(name, "gallery", data_dir=data_dir, config=test_config)
    title = name if test_config is None else f"{name}/{test_config}"
    q = extract(model, variables, query, config, mesh, desc=f"{title}: query")
    g = extract(model, variables, gallery, config, mesh, desc=f"{title}: gallery")
    scores = score_matrix(match_fn(model), variables, q, g, tile_p=config.eval.tile_p,
                          tile_g=config.eval.tile_g, mesh=mesh, progress=True)
    metrics = evaluate_ranking(scores, query.pids, gallery.pids, query.cams, gallery.cams,
                               max_rank=config.eval.max_rank)
    summary = ranking_summary(metrics)
    summary["seconds"] = round(time.time() - t0, 2)
    results["test"][title] = summary
  return results


def write_results(workdir, results: dict) -> Path:
  path = Path(workdir) / "results.json"
  path.write_text(json.dumps(results, indent=2))
  return path


def evaluate_checkpoint(config, checkpoint: str, workdir: str) -> dict:
  """Evaluates a checkpoint (a run's workdir/checkpoint dir, or an official file) on the test
  sets of `config`; the architecture comes from the checkpoint. Writes workdir/results.json."""
  from jaxreid.api import load  # the public loader handles every checkpoint format
  loaded = load(config, checkpoint)
  eval_config = config.copy_and_resolve_references()
  with eval_config.unlocked():
    eval_config.model = loaded.config.model
    eval_config.data.height, eval_config.data.width = loaded.input_size
  mesh = parallel.make_mesh()
  results = evaluate_matcher(eval_config, loaded.module, loaded.variables, mesh)
  results["checkpoint"] = str(checkpoint)
  write_results(workdir, results)
  return results
