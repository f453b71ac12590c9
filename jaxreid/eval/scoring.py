"""Query × gallery scores of a pairwise matcher, in fixed-shape tiles under one jit.

Every tile has the same shape (the last ones are padded), so one executable serves the whole
matrix; peak device memory is that of one tile (QAConv: tile_p × tile_g × hw × hw floats).
Probe rows of a tile are sharded over the devices of a 1-D mesh, the gallery tile and the
variables are replicated, and each finished tile is copied to host as float32. Features stay on
host and are copied tile by tile; the next tile is dispatched before the previous one is read
back, so copies overlap compute.
"""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxreid.parallel import put_global as _put, replicated_to_host

MatchFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@functools.lru_cache(maxsize=None)
def match_fn(model):
  """A stable (cacheable) pure function (variables, probe, gallery) → logits."""
  return lambda variables, p, g: model.apply(variables, p, g, method="match")


def score_matrix(match_fn: MatchFn, variables, probe, gallery, *, tile_p: int = 64,
                 tile_g: int = 256, mesh: jax.sharding.Mesh | None = None,
                 progress: bool = False) -> np.ndarray:
  """Scores [P, G] (float32, host) of `match_fn(variables, probe_tile, gallery_tile)`.

  `match_fn` must be pure and score each (probe row, gallery row) pair independently of the
  other rows in its tile (true in eval mode); padded rows repeat the last real row and are
  dropped. It is part of the jit cache key: pass the same function object to reuse compiled
  code. Tiles shrink to P (rounded up to the device count) and G when those are smaller.
  `mesh` must have a single axis; default: all devices on an axis named "data".
  The gallery is taken one tile at a time as a `ChunkScorer` chunk, the probes stay on host.
  """
  probe, gallery = _host(probe, "probe"), _host(gallery, "gallery")
  num_p, num_g = len(probe), len(gallery)
  if tile_p < 1 or tile_g < 1:
    raise ValueError(f"tile_p and tile_g must be >= 1; got {tile_p} and {tile_g}.")
  scores = np.empty((num_p, num_g), np.float32)
  if num_p == 0 or num_g == 0:
    return scores
  tg = min(tile_g, num_g)
  scorer = ChunkScorer(match_fn, variables, probe, tg, tile_p=tile_p, tile_g=tg, mesh=mesh,
                       probes_on_device=False)
  with tqdm(total=num_p * num_g, unit="pair", unit_scale=True, desc="scoring",
            disable=not progress) as bar:
    for g0 in range(0, num_g, tg):
      valid = min(tg, num_g - g0)
      scores[:, g0:g0 + valid] = scorer.score(scorer.put_chunk(gallery[g0:g0 + valid]), valid,
                                              progress=bar)
  return scores


def pairwise_self_scores(match_fn: MatchFn, variables, feats, **kwargs) -> np.ndarray:
  """`score_matrix(match_fn, variables, feats, feats, **kwargs)` (QQ / GG for re-ranking)."""
  return score_matrix(match_fn, variables, feats, feats, **kwargs)


def _host(x, name):
  """Features as one host array (multi-host sharded arrays are all-gathered first)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  x = np.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"{name} must have a leading batch axis; got a scalar.")
  return x


def _tile(x, start, size):
  """x[start:start + size], padded by repeating the last row (padding stays finite)."""
  t = x[start:start + size]
  if len(t) < size:
    t = np.concatenate([t, np.repeat(t[-1:], size - len(t), axis=0)])
  return t


def _round_up(x, m):
  return -(-x // m) * m


# ------------------------------------------------------------------------------------------------
# Re-scoring only each query's top-k gallery entries of a cheaper first-stage ranking (KPM's
# cascade, docs/methods/kpm.md): any pairwise matcher, P·k matcher calls instead of P·G.


def global_features(model, variables, feats, batch_size: int = 256) -> np.ndarray:
  """[N, D] vectors of encoder features for a first-stage ranking: the matcher's
  `global_features(features)` where it defines one (KPM: the average-pooled final map), else the
  mean over every axis between the first and the last (feature maps → average-pooled)."""
  feats = _host(feats, "features")
  matcher = getattr(model, "matcher", None)
  if matcher is None or not hasattr(matcher, "global_features"):
    return feats.reshape(len(feats), -1, feats.shape[-1]).astype(np.float32).mean(1)
  fn = _global_fn(model)
  return np.concatenate([np.asarray(fn(variables, feats[i:i + batch_size]), np.float32)
                         for i in range(0, len(feats), batch_size)]) if len(feats) else (
                             np.zeros((0, 0), np.float32))


@functools.lru_cache(maxsize=None)
def _global_fn(model):
  return jax.jit(lambda variables, f: model.apply(
      variables, f, method=lambda m, x: m.matcher.global_features(x)))


def first_stage_scores(probe_vectors, gallery_vectors) -> np.ndarray:
  """−‖p − g‖² [P, G] of global vectors (the Euclidean first stage of the KPM authors'
  CascadeEvaluator)."""
  p = np.asarray(probe_vectors, np.float64)
  g = np.asarray(gallery_vectors, np.float64)
  d2 = (p * p).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * p @ g.T
  return (-d2).astype(np.float32)


def rescore_top_k(match_fn: MatchFn, variables, probe, gallery, first_stage, k: int, *,
                  tile_p: int = 64, tile_g: int = 256, progress: bool = False,
                  top_k_fn=None) -> np.ndarray:
  """Scores [P, G]: each probe's `k` best gallery entries under `first_stage` [P, G] (higher =
  better) scored by `match_fn`, the other entries ranked after all of them in their
  first-stage order (first-stage score shifted below the row's lowest re-scored value). With
  k ≥ G every entry is re-scored: the full matrix.

  Work is done in fixed-shape tiles of min(tile_p, P) probes × min(k, tile_g) of each probe's
  own gallery entries (gathered on host, padded by repetition), one jitted, vmapped call per
  tile on the default device; `match_fn` as for `score_matrix`. `top_k_fn(variables, probe
  […], gallery [k, …]) → [k]`, if given, scores a probe's whole top k at once instead (KPM's
  random walk, whose scores depend on the k gallery entries together): tiles of all k columns.
  It must be a stable function object (part of the jit cache key).
  """
  probe, gallery = _host(probe, "probe"), _host(gallery, "gallery")
  first = np.asarray(first_stage, np.float32)
  num_p, num_g = len(probe), len(gallery)
  if first.shape != (num_p, num_g):
    raise ValueError(f"first_stage must be [P, G] = [{num_p}, {num_g}]; got {first.shape}.")
  if k < 1 or tile_p < 1 or tile_g < 1:
    raise ValueError(f"k, tile_p and tile_g must be >= 1; got {k}, {tile_p} and {tile_g}.")
  k = min(k, num_g)
  if num_p == 0 or num_g == 0:
    return first.copy()
  order = top_k_order(first, k)                                                  # [P, k]
  tp, tk = min(tile_p, num_p), (k if top_k_fn is not None else min(k, tile_g))
  rescored = np.empty((num_p, k), np.float32)
  with tqdm(total=num_p * k, unit="pair", unit_scale=True, desc="re-scoring top-k",
            disable=not progress) as bar:
    for p0 in range(0, num_p, tp):
      rows = _tile(np.arange(num_p), p0, tp)
      for k0 in range(0, k, tk):
        cols = _tile(order[rows, k0:k0 + tk].T, 0, tk).T                         # [tp, tk]
        if top_k_fn is None:
          tile = np.asarray(_rescore_tile(match_fn, variables, probe[rows], gallery[cols]))
        else:
          tile = np.asarray(_joint_tile(top_k_fn, variables, probe[rows], gallery[cols]))
        n_p, n_k = min(tp, num_p - p0), min(tk, k - k0)
        rescored[p0:p0 + n_p, k0:k0 + n_k] = tile[:n_p, :n_k]
        bar.update(n_p * n_k)
  return merge_top_k(first, order, rescored)


def top_k_order(first_stage, k: int) -> np.ndarray:
  """[P, min(k, G)] gallery indices of each probe's best first-stage entries, best first (a
  stable sort: ties in gallery order)."""
  return np.argsort(-np.asarray(first_stage), axis=1, kind="stable")[:, :k]


def merge_top_k(first_stage, order, rescored) -> np.ndarray:
  """Scores [P, G]: `rescored` [P, k] at each probe's `order` entries, every other entry its
  first-stage score shifted below the row's lowest re-scored value (ranked after all of them,
  in first-stage order)."""
  first = np.asarray(first_stage, np.float32)
  out = np.empty_like(first)
  if order.shape[1] < first.shape[1]:
    rest = np.ones_like(first, bool)
    np.put_along_axis(rest, order, False, axis=1)
    high = np.where(rest, first, -np.inf).max(1, keepdims=True)
    out[:] = first - high + rescored.min(1, keepdims=True) - 1.0
  np.put_along_axis(out, order, rescored, axis=1)
  return out


def score_pairs(pair_fn, variables, probe, gallery, probe_rows, gallery_rows, tile: int):
  """[N, F] of `pair_fn(variables, probe[probe_rows], gallery[gallery_rows])` (aligned rows →
  [T, F]) in fixed tiles of `tile` pairs (the last padded by repetition; one compiled shape);
  the rows are gathered on host."""
  n = len(probe_rows)
  out = []
  for i in range(0, n, tile):
    pr, gr = _tile(probe_rows, i, tile), _tile(gallery_rows, i, tile)
    out.append(np.asarray(_pair_tile(pair_fn, variables, probe[pr], gallery[gr]))[:n - i])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _pair_tile(pair_fn, variables, probe, gallery):
  return pair_fn(variables, probe, gallery).astype(jnp.float32)


def matched_pairs(match_fn: MatchFn):
  """A `score_pairs` function [T, 1] of aligned rows from a matcher's `match_fn`."""
  return _matched_pairs(match_fn)


@functools.lru_cache(maxsize=None)
def _matched_pairs(match_fn):
  one = lambda variables, p, g: match_fn(variables, p[None], g[None])[0, 0]
  return lambda variables, p, g: jax.vmap(one, (None, 0, 0))(variables, p, g)[:, None]


@functools.partial(jax.jit, static_argnums=0)
def _rescore_tile(match_fn, variables, probe, gallery):
  """probe [tp, …], gallery [tp, tk, …] → [tp, tk]: each probe against its own gallery rows."""
  one = lambda p, g: match_fn(variables, p[None], g)[0].astype(jnp.float32)
  return jax.vmap(one)(probe, gallery)


@functools.partial(jax.jit, static_argnums=0)
def _joint_tile(top_k_fn, variables, probe, gallery):
  """probe [tp, …], gallery [tp, k, …] → [tp, k]: each probe's whole top k at once."""
  return jax.vmap(lambda p, g: top_k_fn(variables, p, g).astype(jnp.float32))(probe, gallery)


# ------------------------------------------------------------------------------------------------
# Streaming: a fixed probe set scored against gallery chunks one at a time (docs/evaluation.md).


class ChunkScorer:
  """Scores [P, valid] of a fixed probe set against gallery chunks of a fixed length.

  The probes are kept resident on the devices (replicated) when `probes_on_device`, else on
  host and copied tile by tile; they are not copied to pad them (only fewer probes than one
  tile are padded, by repeating the last row). A chunk is a [chunk, …] array (device or host) of
  which the first `valid` rows are real; rows past `valid` only need to be finite. Tiles are cut
  inside one jitted function by dynamic slices (the last probe tile and the last gallery tile of
  a chunk are shifted back to stay inside), so one executable serves every chunk; finished tiles
  are read back while the next one computes.
  `match_fn` as for `score_matrix`.
  """

  def __init__(self, match_fn: MatchFn, variables, probe, chunk: int, *, tile_p: int = 64,
               tile_g: int = 256, mesh: jax.sharding.Mesh | None = None,
               probes_on_device: bool = True):
    probe = _host(probe, "probe")
    if tile_p < 1 or tile_g < 1 or chunk < 1:
      raise ValueError(f"tile_p, tile_g and chunk must be >= 1; got {tile_p}, {tile_g}, {chunk}.")
    self.mesh = _auto_mesh(mesh)
    self.match_fn, self.chunk, self.num_p = match_fn, chunk, len(probe)
    n = self.mesh.devices.size
    self.tp = _round_up(min(tile_p, max(self.num_p, 1)), n)
    self.tg = min(tile_g, chunk)
    self.rows = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))
    self.everywhere = NamedSharding(self.mesh, PartitionSpec())
    self.variables = jax.tree.map(lambda x: _put(x, self.everywhere), variables)
    padded = _tile(probe, 0, self.tp) if 0 < self.num_p < self.tp else probe
    self.on_device = probes_on_device
    self.probes = _put(padded, self.everywhere) if probes_on_device else padded

  def put_chunk(self, gallery) -> jax.Array:
    """A host gallery slice (at most `chunk` rows) → a replicated device chunk of `chunk` rows."""
    gallery = _host(gallery, "gallery")
    return _put(_tile(gallery, 0, self.chunk), self.everywhere)

  def score(self, gallery_chunk, valid: int, progress=None) -> np.ndarray:
    """Scores [P, valid] (float32, host) of the probes against gallery_chunk[:valid]."""
    if gallery_chunk.shape[0] != self.chunk or not 0 <= valid <= self.chunk:
      raise ValueError(f"a chunk has {self.chunk} rows and 0..{self.chunk} valid ones; got "
                       f"{gallery_chunk.shape[0]} rows, {valid} valid.")
    out = np.empty((self.num_p, valid), np.float32)
    if self.num_p == 0 or valid == 0:
      return out
    if not isinstance(gallery_chunk, jax.Array):
      gallery_chunk = _put(gallery_chunk, self.everywhere)
    step = functools.partial(_score_chunk_tile, self.match_fn, self.rows, self.everywhere,
                             self.tp, self.tg, self.variables)
    pending = []
    for g0 in range(0, valid, self.tg):
      gs = min(g0, self.chunk - self.tg)   # tiles shifted back to stay inside: one tile shape
      for p0 in range(0, self.num_p, self.tp):
        ps = min(p0, len(self.probes) - self.tp)
        if self.on_device:
          tile = step(self.probes, np.int32(ps), gallery_chunk, np.int32(gs))
        else:
          tile = step(_put(self.probes[ps:ps + self.tp], self.rows), np.int32(0), gallery_chunk,
                      np.int32(gs))
        pending.append((p0, p0 - ps, g0, g0 - gs, tile))
        if len(pending) > 1:
          self._collect(out, valid, *pending.pop(0), progress)
    while pending:
      self._collect(out, valid, *pending.pop(0), progress)
    return out

  def _collect(self, out, valid, p0, skip_p, g0, skip_g, tile, progress):
    tile = replicated_to_host(tile)
    p1, g1 = min(p0 + self.tp, self.num_p), min(g0 + self.tg, valid)
    out[p0:p1, g0:g1] = tile[skip_p:skip_p + p1 - p0, skip_g:skip_g + g1 - g0]
    if progress is not None:
      progress.update((p1 - p0) * (g1 - g0))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _score_chunk_tile(match_fn, rows, everywhere, tp, tg, variables, probes, p0, gallery, g0):
  """probes[p0:p0 + tp] × gallery[g0:g0 + tg], computed row-sharded, gathered everywhere."""
  p = jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(probes, p0, tp), rows)
  g = jax.lax.dynamic_slice_in_dim(gallery, g0, tg)
  s = jax.lax.with_sharding_constraint(match_fn(variables, p, g).astype(jnp.float32), rows)
  return jax.lax.with_sharding_constraint(s, everywhere)


def _auto_mesh(mesh):
  """`mesh` (default: all devices on "data") with Auto axis types, which allow sharding
  constraints (only its devices and axis name are used); it must have one axis."""
  if mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  if len(mesh.axis_names) != 1:
    raise ValueError(f"mesh must have exactly one axis; got axes {mesh.axis_names}.")
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(jax.sharding.AxisType.Auto,))
