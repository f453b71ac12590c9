"""Evaluation of a trained model on each test set: the query maps extracted once, the gallery
encoded and scored chunk by chunk (docs/evaluation.md), then ranked."""
import functools
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from scipy.special import expit
from tqdm.auto import tqdm

from jaxreid import parallel
from jaxreid.data import datasets, pipeline
from jaxreid.eval.metrics import evaluate_ranking, top_k
from jaxreid.eval.rerank import rerank
from jaxreid.eval.scoring import (ChunkScorer, first_stage_scores, global_features, match_fn,
                                   matched_pairs, merge_top_k, rescore_top_k, score_matrix,
                                   score_pairs, top_k_order)
from jaxreid.eval.tlift import tlift

RANKS = (1, 5, 10, 20)
DISTANCES = ("sigmoid", "neg")
# Defaults of the streaming fields, read with config.eval.get so older configs keep working.
GALLERY_CHUNK_BATCHES = 16        # eval.gallery_chunk = 0: this many eval batches per chunk
PROBES_ON_DEVICE_MB = 16384       # eval.probes_on_device_mb: larger probe sets stay on host
RERANK_IN_MEMORY_MB = 2048        # eval.rerank_in_memory_mb: a larger GG goes to disk in blocks


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


def gallery_chunk(config, num_gallery: int) -> int:
  """Gallery images per chunk: eval.gallery_chunk (0: GALLERY_CHUNK_BATCHES eval batches)
  rounded up to a multiple of eval.batch_size, at most the gallery rounded up likewise."""
  batch_size = config.eval.batch_size
  chunk = int(config.eval.get("gallery_chunk", 0)) or GALLERY_CHUNK_BATCHES * batch_size
  return max(batch_size, min(_round_up(chunk, batch_size), _round_up(num_gallery, batch_size)))


@functools.lru_cache(maxsize=None)
def _jitted_encode_into(model, mesh):
  """(variables, maps [C, …], images [C / B, B, h, w, 3], i) → maps with rows i·B … (i + 1)·B − 1
  replaced by the encoding of images[i]; the maps buffer is donated (one buffer per chunk)."""
  def fn(variables, maps, images, i):
    new = model.apply(variables, images[i], method="encode").astype(maps.dtype)
    return jax.lax.dynamic_update_slice_in_dim(maps, new, i * images.shape[1], axis=0)
  return jax.jit(fn, out_shardings=parallel.replicated(mesh), donate_argnums=1)


def encode_chunks(model, variables, split, config, mesh, chunk: int, *, desc="encode"):
  """Yields (start, maps, valid) for consecutive chunks of `split`: maps is a replicated device
  array [chunk, …] whose first `valid` rows encode images start … start + valid − 1 (the other
  rows are finite leftovers). The buffer is reused by the next chunk: read it before asking.

  A background thread decodes the next chunk's images while the devices work on this one; each
  chunk's images go to the devices in one transfer (batches sharded over the mesh).
  """
  batch_size = config.eval.batch_size
  parallel.check_divisible(batch_size, mesh, "eval.batch_size")
  if chunk % batch_size:
    raise ValueError(f"a chunk ({chunk}) must be a multiple of eval.batch_size ({batch_size}).")
  h, w = config.data.height, config.data.width
  per_chunk = chunk // batch_size
  variables = parallel.replicate(variables, mesh)
  encode = _jitted_encode_into(model, mesh)
  images_sharding = NamedSharding(mesh, PartitionSpec(None, parallel.AXIS))
  shape = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables,
                         jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.uint8))
  maps = jax.jit(lambda: jnp.zeros((chunk, *shape.shape[1:]), shape.dtype),
                 out_shardings=parallel.replicated(mesh))()
  chunks = _background(_image_chunks(split, config, per_chunk))
  n = len(split)
  with tqdm(total=n, desc=desc, leave=False, dynamic_ncols=True, unit="img") as bar:
    for start, images, valid in chunks:
      images = parallel.put_global(images, images_sharding)
      for i in range(-(-valid // batch_size)):
        maps = encode(variables, maps, images, np.int32(i))
      yield start, maps, valid
      bar.update(valid)


def _image_chunks(split, config, per_chunk):
  """(start, uint8 [per_chunk, B, h, w, 3], valid) of `split` in order; missing rows are zero."""
  images, start, valid, full = None, 0, 0, 0
  for batch, real in pipeline.eval_batches(split, batch_size=config.eval.batch_size,
                                           height=config.data.height, width=config.data.width,
                                           resize=config.data.get("resize", "bicubic"),
                                           prefetch=per_chunk):
    if images is None:
      images = np.zeros((per_chunk, *batch["image"].shape), np.uint8)
    images[full] = batch["image"]
    full, valid = full + 1, valid + real
    if full == per_chunk or start + valid == len(split):
      yield start, images, valid
      images, start, valid, full = None, start + valid, 0, 0


def _background(iterator, depth: int = 1):
  """`iterator` run ahead by `depth` items in a daemon thread; its exceptions re-raised here."""
  items = queue.Queue(maxsize=depth)
  done = object()

  def work():
    try:
      for item in iterator:
        items.put(item)
      items.put(done)
    except BaseException as e:  # handed to the consumer
      items.put(e)

  threading.Thread(target=work, daemon=True).start()
  while (item := items.get()) is not done:
    if isinstance(item, BaseException):
      raise item
    yield item


def streamed_scores(model, variables, probe, split, config, mesh, *, keep_gallery=False,
                    desc="gallery"):
  """Scores [P, len(split)] of the `probe` features against every image of `split`, encoded and
  scored one chunk (`gallery_chunk`) at a time, and the gallery features [G, …] on host when
  `keep_gallery` (else None). Peak memory: probes + one chunk + the [P, G] scores."""
  chunk = gallery_chunk(config, len(split))
  scorer = ChunkScorer(match_fn(model), variables, probe, chunk, tile_p=config.eval.tile_p,
                       tile_g=config.eval.tile_g, mesh=mesh,
                       probes_on_device=_fits_device(probe, config))
  scores = np.empty((len(probe), len(split)), np.float32)
  kept = []
  with tqdm(total=scores.size, unit="pair", unit_scale=True, desc=f"{desc}: scoring",
            leave=False, dynamic_ncols=True) as bar:
    for start, maps, valid in encode_chunks(model, variables, split, config, mesh, chunk,
                                            desc=f"{desc}: encoding"):
      scores[:, start:start + valid] = scorer.score(maps, valid, progress=bar)
      if keep_gallery:
        kept.append(parallel.replicated_to_host(maps)[:valid].copy())
  return scores, (np.concatenate(kept) if keep_gallery else None)


def streamed_rescored(model, variables, probe, split, config, mesh, *, desc="gallery"):
  """`rescored` with `split` streamed (docs/evaluation.md): the gallery is encoded chunk by chunk
  into the first stage's pooled vectors, then again, each chunk scoring only the pairs of the
  probes' top eval.rescore_top_k that fall in it; with eval.random_walk_alpha the walk then runs
  per probe on its top k's pair scores and pooled vectors. Peak memory: the probes, one chunk,
  the [G, C] vectors and [P, k] pair scores besides the [P, G] result."""
  ev = config.eval
  chunk = gallery_chunk(config, len(split))
  chunks = lambda what: encode_chunks(model, variables, split, config, mesh, chunk,
                                      desc=f"{desc}: {what}")
  pooled = np.concatenate([global_features(model, variables,
                                           parallel.replicated_to_host(maps)[:valid])
                           for _, maps, valid in chunks("first stage")])
  first = first_stage_scores(global_features(model, variables, probe), pooled)
  order = top_k_order(first, ev.rescore_top_k)
  num_p, k = order.shape
  alpha = float(ev.get("random_walk_alpha", 0.0))
  pair_fn = group_logits_fn(model) if alpha else matched_pairs(match_fn(model))
  tile = max(1, min(ev.tile_p * ev.tile_g, num_p * k))
  pairs = None
  for start, maps, valid in chunks(f"top-{k} pairs"):
    rows, cols = np.nonzero((order >= start) & (order < start + valid))
    if not len(rows):
      continue
    out = score_pairs(pair_fn, variables, probe, parallel.replicated_to_host(maps)[:valid], rows,
                      order[rows, cols] - start, tile)
    if pairs is None:
      pairs = np.empty((num_p, k, out.shape[1]), np.float32)
    pairs[rows, cols] = out
  if not alpha:
    return merge_top_k(first, order, pairs[..., 0])
  walk = _jitted_walk(model, alpha)
  tp = min(ev.tile_p, num_p)
  walked = np.empty((num_p, k), np.float32)
  for p0 in range(0, num_p, tp):
    rows = np.minimum(np.arange(p0, p0 + tp), num_p - 1)     # the last tile padded by repetition
    walked[p0:p0 + tp] = np.asarray(walk(variables, pairs[rows], pooled[order[rows]]))[
        :num_p - p0]
  return merge_top_k(first, order, walked)


@functools.lru_cache(maxsize=None)
def group_logits_fn(model):
  """(variables, probe [T, …], gallery [T, …]) → [T, E·E]: the matcher's per-(embed, group)
  logits of aligned pairs (KPM's released variant), for `streamed_rescored`'s walk."""
  if not hasattr(getattr(model, "matcher", None), "group_logits"):
    raise ValueError("eval.random_walk_alpha > 0 needs a matcher with a random walk (KPM's "
                     "released variant); set it to 0.")
  return lambda variables, p, g: model.apply(variables, p, g,
                                             method=lambda m, p, g: m.matcher.group_logits(p, g))


@functools.lru_cache(maxsize=None)
def _jitted_walk(model, alpha: float):
  """(variables, group logits [T, k, E·E], pooled [T, k, C]) → walked logits [T, k]."""
  one = lambda variables, a, b: model.apply(variables, a, b,
                                            method=lambda m, a, b: m.matcher.walk(a, b, alpha))
  return jax.jit(lambda variables, a, b: jax.vmap(one, (None, 0, 0))(variables, a, b))


def _fits_device(features, config) -> bool:
  return features.nbytes <= config.eval.get("probes_on_device_mb", PROBES_ON_DEVICE_MB) * 2**20


def _round_up(x, m):
  return -(-x // m) * m


def evaluate_matcher(config, model, variables, mesh, workdir=None, refine=None) -> dict:
  """Results of every test set in `config.dataset.test`, each reported separately.

  The query features are extracted once; the gallery is encoded and scored eval.gallery_chunk
  images at a time (docs/evaluation.md), so no gallery-sized feature array exists unless
  re-ranking needs one; with eval.rescore_top_k it is encoded twice (`streamed_rescored`).
  With `refine`, eval.rescore_top_k and re-ranking, or eval.stream = False, the gallery
  features are extracted whole first and scored by `pair_scorer` (the in-memory path, which
  --mode=rank shares through `ranking_scores`; both give the same scores).

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
  results = {"test": {}, "paper": config.eval.paper.to_dict(),
             "eval_settings": eval_settings(config)}
  retrieval = {}
  rescore = config.eval.get("rescore_top_k", 0)
  stream = (refine is None and config.eval.get("stream", True)
            and not (rescore and config.eval.rerank))
  for name, test_config in datasets.parse_specs(config.dataset.test):
    t0 = time.time()
    query = datasets.load_split(name, "query", data_dir=data_dir, config=test_config)
    gallery = datasets.load_split(name, "gallery", data_dir=data_dir, config=test_config)
    title = name if test_config is None else f"{name}/{test_config}"
    q = extract(model, variables, query, config, mesh, desc=f"{title}: query")
    score = functools.partial(score_matrix, match_fn(model), variables, tile_p=config.eval.tile_p,
                              tile_g=config.eval.tile_g, mesh=mesh, progress=True)
    to_dist = functools.partial(score_distance, kind=config.eval.distance)
    if stream and rescore:
      scores, g = streamed_rescored(model, variables, q, gallery, config, mesh, desc=title), None
      self_distances = None       # re-ranking takes the in-memory path
    elif stream:
      scores, g = streamed_scores(model, variables, q, gallery, config, mesh,
                                  keep_gallery=config.eval.rerank, desc=title)
      self_distances = lambda: (to_dist(score(q, q)),
                                gallery_distances(model, variables, g, config, mesh))
    else:
      g = extract(model, variables, gallery, config, mesh, desc=f"{title}: gallery")
      if refine is not None:
        q, g = refine(q, g)
      score = pair_scorer(model, variables, config, mesh)
      scores = score(q, g)
      self_distances = lambda: (to_dist(score(q, q)), to_dist(score(g, g)))
    rows, notes = {}, []
    t_row = time.time()
    for row, similarity in post_processed(config.eval, scores, self_distances, query, gallery,
                                          title, notes, block_dir=workdir):
      metrics = evaluate_ranking(similarity, query.pids, gallery.pids, query.cams, gallery.cams,
                                 max_rank=config.eval.max_rank)
      rows[row] = {**ranking_summary(metrics), "seconds": round(time.time() - t_row, 2)}
      if workdir is not None and config.eval.retrieval_top_k > 0:
        indices, values = top_k(similarity, config.eval.retrieval_top_k)
        retrieval[f"{title}/{row}/indices"], retrieval[f"{title}/{row}/scores"] = indices, values
      del similarity
      t_row = time.time()
    scores = g = None      # the [P, G] scores and kept gallery features go before the next set
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
    try:
      np.savez(Path(workdir) / "retrieval.npz", **retrieval)
    except OSError as e:
      raise OSError(f"could not write {Path(workdir) / 'retrieval.npz'} ({e.strerror or e}); the "
                    "run's checkpoints are intact: free disk space, then rerun to evaluate "
                    "again") from None
  return results


def gallery_distances(model, variables, g, config, mesh):
  """GG re-ranking distances of the gallery features `g`: a [G, G] array when its float32 size
  is at most eval.rerank_in_memory_mb, else a function of column blocks for `rerank` (scored
  against the gallery features kept on the devices, each block once; `rerank` keeps them in an
  on-disk memmap)."""
  to_dist = functools.partial(score_distance, kind=config.eval.distance)
  num_g = len(g)
  limit = config.eval.get("rerank_in_memory_mb", RERANK_IN_MEMORY_MB) * 2**20
  if 4 * num_g * num_g <= limit:
    return to_dist(score_matrix(match_fn(model), variables, g, g, tile_p=config.eval.tile_p,
                                tile_g=config.eval.tile_g, mesh=mesh, progress=True))
  scorer = ChunkScorer(match_fn(model), variables, g, gallery_chunk(config, num_g),
                       tile_p=config.eval.tile_p, tile_g=config.eval.tile_g, mesh=mesh,
                       probes_on_device=_fits_device(g, config))

  def columns(start, stop):
    """GG[:, start:stop]ᵀ as distances (every gallery item against items start … stop − 1)."""
    out = np.empty((stop - start, num_g), np.float32)
    for c0 in range(start, stop, scorer.chunk):
      part = g[c0:min(stop, c0 + scorer.chunk)]
      out[c0 - start:c0 - start + len(part)] = to_dist(
          scorer.score(scorer.put_chunk(part), len(part))).T
    return out

  columns.block_columns = scorer.chunk
  return columns


def pair_scorer(model, variables, config, mesh=None):
  """The method's scores of extracted features, `score(p, g)` → [P, G] (float32, host, higher =
  better): the matcher on every pair, or with eval.rescore_top_k each probe's top k of a first
  stage re-scored (`rescored`). The in-memory path of `evaluate_matcher`; `ranking_scores`
  (--mode=rank) ranks with it too."""
  if config.eval.get("rescore_top_k", 0):   # only each query's top-k of a first stage
    return functools.partial(rescored, model, variables, config.eval)
  if config.eval.get("random_walk_alpha", 0.0):
    raise ValueError("eval.random_walk_alpha > 0 walks over each query's top-k gallery entries; "
                     "set eval.rescore_top_k (the authors' 75), or set the alpha to 0.")
  return functools.partial(score_matrix, match_fn(model), variables, tile_p=config.eval.tile_p,
                           tile_g=config.eval.tile_g, mesh=mesh, progress=True)


def ranking_scores(config, model, variables, q, g, *, mesh=None, refine=None,
                   rerank: bool = False) -> np.ndarray:
  """What evaluation ranks the extracted gallery features `g` by for each query of `q`:
  `refine` (NFormer), `pair_scorer` (top-k re-scoring, KPM's random walk), then with `rerank`
  the "+RR" row's k-reciprocal re-ranking (−distance). [P, G], higher = better."""
  if refine is not None:
    q, g = refine(q, g)
  score = pair_scorer(model, variables, config, mesh)
  scores = score(q, g)
  if not rerank:
    return scores
  to_dist = functools.partial(score_distance, kind=config.eval.get("distance", "sigmoid"))
  return reranked(config.eval, scores, to_dist(score(q, q)), to_dist(score(g, g)))


def reranked(eval_config, scores, qq, gg, block_dir=None) -> np.ndarray:
  """−(k-reciprocal re-ranked distance) [P, G] of the scores, from the QQ and GG distances (GG
  may be a function of column blocks, see `rerank`)."""
  return -rerank(score_distance(scores, eval_config.get("distance", "sigmoid")), qq, gg,
                 k1=eval_config.get("rerank_k1", 20), k2=eval_config.get("rerank_k2", 6),
                 lambda_value=eval_config.get("rerank_lambda", 0.3), block_dir=block_dir,
                 block_columns=getattr(gg, "block_columns", None))


def rescored(model, variables, eval_config, probe, gallery) -> np.ndarray:
  """`scoring.rescore_top_k` with eval.rescore_top_k entries per query re-scored by the matcher,
  after a first stage of −‖p − g‖² on `scoring.global_features`; with eval.random_walk_alpha
  > 0, by the matcher's `walked` scores of each query's whole top k (KPM's released evaluation,
  docs/methods/kpm.md: the walked logit, whose distance P(different) is sigmoid(−logit))."""
  first = first_stage_scores(global_features(model, variables, probe),
                             global_features(model, variables, gallery))
  alpha = float(eval_config.get("random_walk_alpha", 0.0))
  return rescore_top_k(match_fn(model), variables, probe, gallery, first,
                       eval_config.rescore_top_k, tile_p=eval_config.tile_p,
                       tile_g=eval_config.tile_g, progress=True,
                       top_k_fn=walk_fn(model, alpha) if alpha else None)


@functools.lru_cache(maxsize=None)
def walk_fn(model, alpha: float):
  """(variables, probe […], gallery [k, …]) → [k]: the matcher's random-walked scores of one
  probe's top k (a stable function per model and α, for the jit cache)."""
  if not hasattr(getattr(model, "matcher", None), "walked"):
    raise ValueError("eval.random_walk_alpha > 0 needs a matcher with a random walk (KPM's "
                     "released variant); set it to 0.")
  return lambda variables, p, g: model.apply(variables, p, g,
                                             method=lambda m, p, g: m.matcher.walked(p, g, alpha))


def post_processed(eval_config, scores, self_distances, query, gallery, title, notes,
                   block_dir=None):
  """Yields (row, similarity [P, G]) for "plain" and each post-processing eval_config enables.

  `self_distances()` gives the (QQ, GG) re-ranking distances (`score_distance` of the matcher
  scores; GG may be a function of column blocks, see `rerank`, whose on-disk blocks go under
  `block_dir`); it is called only for re-ranking. TLift
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
    qq, gg = self_distances()
    similarity = reranked(eval_config, scores, qq, gg, block_dir=block_dir)
    del qq, gg
    yield "+RR", similarity
    if use_tlift:
      yield "+RR+TLift", lift(1 + similarity)


def score_distance(scores, kind="sigmoid"):
  """Matcher logits → distances for re-ranking: 1 - sigmoid(s/10) ("sigmoid") or -s ("neg")."""
  if kind == "sigmoid":
    return 1 - expit(scores / 10)
  if kind == "neg":
    return -scores
  raise ValueError(f"distance kind must be one of {DISTANCES}; got {kind!r}.")


def eval_settings(config) -> dict:
  """What an evaluation's results depend on besides the model: the test sets and the eval
  fields (the paper's reference numbers aside), as JSON stores them."""
  settings = {"test": config.dataset.test,
              "eval": {k: v for k, v in config.eval.to_dict().items() if k != "paper"}}
  return json.loads(json.dumps(settings))


def write_results(workdir, results: dict) -> Path:
  """workdir/results.json, replaced whole (a kill mid-write leaves the previous file); earlier
  results of another step or other settings are kept in workdir/results_history/."""
  path = Path(workdir) / "results.json"
  try:
    previous = json.loads(path.read_text())
  except (OSError, ValueError):
    previous = None
  if previous and previous.get("test") and (previous.get("step"), previous.get("eval_settings")) != (
      results.get("step"), results.get("eval_settings")):
    history = path.with_name("results_history")
    history.mkdir(exist_ok=True)
    (history / f"{len(list(history.glob('*.json'))):03d}.json").write_text(
        json.dumps(previous, indent=2))
  partial = path.with_name(f".results.json.{os.getpid()}.partial")
  try:
    partial.write_text(json.dumps(results, indent=2))
    os.replace(partial, path)
  except OSError as e:
    partial.unlink(missing_ok=True)
    raise OSError(f"could not write {path} ({e.strerror or e}); the run's checkpoints are "
                  "intact: free disk space, then rerun to evaluate again") from None
  return path
