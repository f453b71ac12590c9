"""Evaluation of a trained model on each test set: extract once, score in tiles, rank."""
import functools
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from scipy.special import expit
from tqdm.auto import tqdm

from jaxreid import parallel
from jaxreid.data import datasets, pipeline
from jaxreid.eval.metrics import evaluate_ranking, top_k
from jaxreid.eval.rerank import rerank
from jaxreid.eval.scoring import (first_stage_scores, global_features, match_fn,
                                   rescore_top_k, score_matrix)
from jaxreid.eval.tlift import tlift

RANKS = (1, 5, 10, 20)
DISTANCES = ("sigmoid", "neg")


@functools.lru_cache(maxsize=None)
def jitted_encode(model, mesh):
  """encode(variables, images) jitted with the images sharded over `mesh` (cached per model)."""
  fn = lambda variables, images: model.apply(variables, images, method="encode")
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.replicated(mesh))


def extract(model, variables, split, config, mesh, *, indices=None, desc="extract") -> np.ndarray:
  """Encodes `split` (or its `indices`) in fixed-size batches → host float32 array."""
  batch_size = config.eval.batch_size
  parallel.check_divisible(batch_size, mesh, "eval.batch_size")
  encode = jitted_encode(model, mesh)
  variables = parallel.replicate(variables, mesh)
  n = len(split) if indices is None else len(indices)
  out = []
  batches = pipeline.eval_batches(split, batch_size=batch_size, height=config.data.height,
                                  width=config.data.width, indices=indices,
                                  resize=config.data.get("resize", "bicubic"))
  for batch, valid in tqdm(batches, total=-(-n // batch_size), desc=desc, leave=False,
                           dynamic_ncols=True):
    maps = encode(variables, parallel.put_global(batch["image"], parallel.batch_sharded(mesh)))
    out.append(parallel.replicated_to_host(maps)[:valid])
  return np.concatenate(out)


def ranking_summary(metrics: dict) -> dict:
  """R1/5/10/20, mAP, mINP in percent."""
  cmc = metrics["cmc"]
  out = {f"R{r}": round(100 * float(cmc[r - 1]), 2) for r in RANKS if r <= len(cmc)}
  out.update(mAP=round(100 * float(metrics["mAP"]), 2), mINP=round(100 * float(metrics["mINP"]), 2),
             num_queries=int(metrics["num_valid_queries"]))
  return out


def evaluate_matcher(config, model, variables, mesh, workdir=None, refine=None) -> dict:
  """Results of every test set in `config.dataset.test`, each reported separately.

  `refine(q, g) → (q', g')`, if given, transforms the extracted query and gallery features of a
  test set before scoring (NFormer's set refinement).

  With eval.rerank / eval.tlift on, a test set's entry also has `rows`: the metrics of the plain
  scores and of each post-processing, in the QAConv paper's Table 2 order (plain, +TLift, +RR,
  +RR+TLift); its top-level metrics stay the plain ones. With a `workdir`, every row's top
  eval.retrieval_top_k gallery entries per query go to workdir/retrieval.npz.
  """
  if config.eval.distance not in DISTANCES:
    raise ValueError(f"eval.distance must be one of {DISTANCES}; got {config.eval.distance!r}.")
  data_dir = config.dataset.data_dir
  results = {"test": {}, "paper": config.eval.paper.to_dict()}
  retrieval = {}
  for name, test_config in datasets.parse_specs(config.dataset.test):
    t0 = time.time()
    query = datasets.load_split(name, "query", data_dir=data_dir, config=test_config)
    gallery = datasets.load_split(name, "gallery", data_dir=data_dir, config=test_config)
    title = name if test_config is None else f"{name}/{test_config}"
    q = extract(model, variables, query, config, mesh, desc=f"{title}: query")
    g = extract(model, variables, gallery, config, mesh, desc=f"{title}: gallery")
    if refine is not None:
      q, g = refine(q, g)
    score = functools.partial(score_matrix, match_fn(model), variables, tile_p=config.eval.tile_p,
                              tile_g=config.eval.tile_g, mesh=mesh, progress=True)
    if config.eval.get("rescore_top_k", 0):   # only each query's top-k of a first stage
      score = functools.partial(rescored, model, variables, config.eval)
    rows, notes = {}, []
    t_row = time.time()
    for row, similarity in post_processed(config.eval, score(q, g), lambda: (score(q, q),
                                                                             score(g, g)),
                                          query, gallery, title, notes):
      metrics = evaluate_ranking(similarity, query.pids, gallery.pids, query.cams, gallery.cams,
                                 max_rank=config.eval.max_rank)
      rows[row] = {**ranking_summary(metrics), "seconds": round(time.time() - t_row, 2)}
      if workdir is not None and config.eval.retrieval_top_k > 0:
        indices, values = top_k(similarity, config.eval.retrieval_top_k)
        retrieval[f"{title}/{row}/indices"], retrieval[f"{title}/{row}/scores"] = indices, values
      del similarity
      t_row = time.time()
    summary = {**rows["plain"], "seconds": round(time.time() - t0, 2)}
    if len(rows) > 1:
      summary["rows"] = rows
    if notes:
      summary["notes"] = notes
    results["test"][title] = summary
    if retrieval:
      retrieval[f"{title}/query_filenames"] = np.asarray(query.filenames)
      retrieval[f"{title}/gallery_filenames"] = np.asarray(gallery.filenames)
  if retrieval and jax.process_index() == 0:
    np.savez(Path(workdir) / "retrieval.npz", **retrieval)
  return results


def rescored(model, variables, eval_config, probe, gallery) -> np.ndarray:
  """`scoring.rescore_top_k` with eval.rescore_top_k entries per query re-scored by the matcher,
  after a first stage of −‖p − g‖² on `scoring.global_features`."""
  first = first_stage_scores(global_features(model, variables, probe),
                             global_features(model, variables, gallery))
  return rescore_top_k(match_fn(model), variables, probe, gallery, first,
                       eval_config.rescore_top_k, tile_p=eval_config.tile_p,
                       tile_g=eval_config.tile_g, progress=True)


def post_processed(eval_config, scores, self_scores, query, gallery, title, notes):
  """Yields (row, similarity [P, G]) for "plain" and each post-processing eval_config enables.

  `self_scores()` gives the (QQ, GG) matcher scores; it is called only for re-ranking. TLift
  lifts sigmoid(s/10), or 1 - the re-ranked distance; +RR ranks by -distance. A test set
  without times gets a note in `notes` instead of the TLift rows.
  """
  yield "plain", scores
  use_tlift = eval_config.tlift
  if use_tlift and (np.isnan(query.times).any() or np.isnan(gallery.times).any()):
    notes.append(f"TLift skipped: {title} has no image times (TLift needs them); the results "
                 "are without TLift.")
    logging.getLogger(__name__).warning(notes[-1])
    use_tlift = False
  lift = functools.partial(tlift, gallery_cams=gallery.cams, gallery_times=gallery.times,
                           query_cams=query.cams, query_times=query.times,
                           tau=eval_config.tlift_tau, sigma=eval_config.tlift_sigma,
                           K=eval_config.tlift_k, alpha=eval_config.tlift_alpha)
  if use_tlift:
    yield "+TLift", lift(expit(scores / 10))
  if eval_config.rerank:
    qq, gg = self_scores()
    to_dist = functools.partial(score_distance, kind=eval_config.distance)
    dist = rerank(to_dist(scores), to_dist(qq), to_dist(gg), k1=eval_config.rerank_k1,
                  k2=eval_config.rerank_k2, lambda_value=eval_config.rerank_lambda)
    del qq, gg
    yield "+RR", -dist
    if use_tlift:
      yield "+RR+TLift", lift(1 - dist)


def score_distance(scores, kind="sigmoid"):
  """Matcher logits → distances for re-ranking: 1 - sigmoid(s/10) ("sigmoid") or -s ("neg")."""
  if kind == "sigmoid":
    return 1 - expit(scores / 10)
  if kind == "neg":
    return -scores
  raise ValueError(f"distance kind must be one of {DISTANCES}; got {kind!r}.")


def write_results(workdir, results: dict) -> Path:
  path = Path(workdir) / "results.json"
  path.write_text(json.dumps(results, indent=2))
  return path
