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
  """
  probe, gallery = _host(probe, "probe"), _host(gallery, "gallery")
  num_p, num_g = len(probe), len(gallery)
  if tile_p < 1 or tile_g < 1:
    raise ValueError(f"tile_p and tile_g must be >= 1; got {tile_p} and {tile_g}.")
  if mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  if len(mesh.axis_names) != 1:
    raise ValueError(f"mesh must have exactly one axis; got axes {mesh.axis_names}.")
  # Only the devices and the axis name are used; Auto axes allow sharding constraints.
  mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(jax.sharding.AxisType.Auto,))
  scores = np.empty((num_p, num_g), np.float32)
  if num_p == 0 or num_g == 0:
    return scores

  n = mesh.devices.size
  tp = _round_up(min(tile_p, num_p), n)
  tg = min(tile_g, num_g)
  rows = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  everywhere = NamedSharding(mesh, PartitionSpec())
  variables = jax.tree.map(lambda x: _put(x, everywhere), variables)
  step = functools.partial(_score_tile, match_fn, rows, everywhere, variables)

  pending = []  # one tile in flight while the previous one is copied to host
  with tqdm(total=num_p * num_g, unit="pair", unit_scale=True, desc="scoring",
            disable=not progress) as bar:
    for g0 in range(0, num_g, tg):
      gallery_tile = _put(_tile(gallery, g0, tg), everywhere)
      for p0 in range(0, num_p, tp):
        pending.append((p0, g0, step(_put(_tile(probe, p0, tp), rows), gallery_tile)))
        if len(pending) > 1:
          _collect(scores, *pending.pop(0), bar)
    while pending:
      _collect(scores, *pending.pop(0), bar)
  return scores


def pairwise_self_scores(match_fn: MatchFn, variables, feats, **kwargs) -> np.ndarray:
  """`score_matrix(match_fn, variables, feats, feats, **kwargs)` (QQ / GG for re-ranking)."""
  return score_matrix(match_fn, variables, feats, feats, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _score_tile(match_fn, rows, everywhere, variables, probe, gallery):
  """One tile, computed row-sharded, then gathered to every device for reading back."""
  s = jax.lax.with_sharding_constraint(match_fn(variables, probe, gallery).astype(jnp.float32),
                                       rows)
  return jax.lax.with_sharding_constraint(s, everywhere)


def _collect(scores, p0, g0, tile, bar):
  tile = replicated_to_host(tile)
  p1, g1 = min(p0 + tile.shape[0], scores.shape[0]), min(g0 + tile.shape[1], scores.shape[1])
  scores[p0:p1, g0:g1] = tile[:p1 - p0, :g1 - g0]
  bar.update((p1 - p0) * (g1 - g0))


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
