"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) without any (P+G)² temporary.

Only the first k1 + 1 neighbours of every item, a few sparse weights per item and the query
rows' Jaccard distances are ever needed, so the (P+G)² matrices of the authors' dense code
(distances, full argsort, V, query-expanded V) are replaced by a neighbour table, sparse V and
blocks of rows read from the inputs. GG may also come as a function of column blocks, computed
in the pass that builds the neighbour table and kept in an on-disk .npy file for the later lookups
(docs/evaluation.md), so no G² array is ever in memory.
"""
import functools
import tempfile

import jax
import numpy as np
from scipy import sparse

# Elements of the (P+G)² working matrix (or of the [P, G] output) per block.
_BLOCK_ELEMENTS = 1 << 21
# (query, gallery) weight pairs per Jaccard step.
_PAIRS_PER_STEP = 1 << 20
# Elements of GG asked of a block function at a time (64 MB of float32).
_FETCH_ELEMENTS = 1 << 24


def rerank(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3, *,
           block_dir=None, block_columns=None) -> np.ndarray:
  """Re-ranked query × gallery distances, float32 [P, G] (lower = more similar).

  Computes what the authors' dense `re_ranking` computes, with the distances not squared (see
  docs/README.md): D = [[QQ, QG], [QGᵀ, GG]] (N = P + G), each column divided by its maximum
  (which must be positive) and the result transposed, so row i ranks its neighbours by D[:, i];
  ties rank in index order (a stable sort); k-reciprocal sets of the k1 + 1 nearest, expanded by
  the sets of round(k1 / 2) + 1 nearest that overlap by more than 2/3; weights exp(-d)
  normalised per row; query expansion averages the k2 nearest rows; Jaccard distances of the
  query rows; result (1 - λ)·Jaccard + λ·D for the query × gallery block. Inputs are float32-cast
  as the reference code does.

  Memory kept besides the inputs and the output: the N × max(k1 + 1, k2) neighbour table, N
  column maxima, the sparse weights (at most (k1 + 1)(round(k1 / 2) + 2) per row, up to k2 times
  that after query expansion) and a few blocks of ~2M floats at a time. The inputs are only read by
  column slices and scattered lookups, so they may be np.memmap arrays.

  `g_g_dist` may instead be a function `gg(start, stop)` → float32 [stop - start, G], the
  distances GG[:, start:stop]ᵀ of every gallery item to items start..stop-1 (columns of GG). It
  is called once per block of columns, in order, during the pass that builds the neighbour table
  and the column maxima; each block is also written (transposed, so a column is one contiguous
  row) to an .npy file of G² float32 in a temporary directory under `block_dir` (default: the
  system's), which later lookups read a few rows at a time and which is deleted on return.
  `block_columns`: columns per call (default: 64 MB of float32 per block).
  """
  if callable(g_g_dist):
    with tempfile.TemporaryDirectory(dir=block_dir, prefix="rerank_gg_") as tmp:
      return _rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value, tmp, block_columns)
  return _rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value, None, None)


def _rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value, tmp, block_columns):
  qg, qq, gg, k1, k2 = _check(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)
  gg = _Gallery(gg, qg.shape[1], tmp, block_columns)
  num_p, num_g = qg.shape
  n = num_p + num_g
  k = min(k1 + 1, n)
  k_half = min(int(np.around(k1 / 2.0)) + 1, n)
  ranks, col_max = _neighbours(qg, qq, gg, min(max(k1 + 1, k2), n))
  reciprocal = _reciprocal_mask(ranks, k)
  half_reciprocal = _reciprocal_mask(ranks, k_half)

  rows, cols, vals = [], [], []
  step = max(1, _BLOCK_ELEMENTS // (k * k * k_half))
  for start in range(0, n, step):
    r, c = _expansion(ranks, reciprocal, half_reciprocal, np.arange(start, min(n, start + step)))
    vals.append(_weights(r, _lookup(qg, qq, gg, col_max, r, c)))
    rows.append(r)
    cols.append(c)
  v = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(n, n), dtype=np.float32)
  if k2 != 1:
    v = _query_expansion(v, ranks[:, :min(k2, n)])
  return _final(v, qg, col_max[:num_p], lambda_value)


def _check(qg, qq, gg, k1, k2, lambda_value):
  qg, qq = (x if isinstance(x, np.ndarray) else np.asarray(x) for x in (qg, qq))
  gg = gg if callable(gg) or isinstance(gg, np.ndarray) else np.asarray(gg)
  gg_shape = (qg.shape[1:] * 2) if callable(gg) else gg.shape
  if qg.ndim != 2 or qq.shape != (len(qg),) * 2 or gg_shape != (qg.shape[1],) * 2:
    raise ValueError(f"rerank needs q_g_dist [P, G], q_q_dist [P, P], g_g_dist [G, G]; got "
                     f"{qg.shape}, {qq.shape}, {gg_shape}.")
  if 0 in qg.shape:
    raise ValueError(f"rerank needs at least one query and one gallery item; got {qg.shape}.")
  if int(k1) != k1 or int(k2) != k2 or k1 < 1 or k2 < 1:
    raise ValueError(f"k1 and k2 must be integers >= 1; got k1={k1}, k2={k2}.")
  if not 0 <= lambda_value <= 1:
    raise ValueError(f"lambda_value weighs the original distance against the Jaccard distance "
                     f"and must lie in [0, 1]; got {lambda_value}.")
  return qg, qq, gg, int(k1), int(k2)


class _Gallery:
  """GG read by column blocks and by entries: an array [G, G], or a block function whose blocks
  are appended, as they are first read (in column order), to an .npy file holding GGᵀ (one
  column per row). The file is written and read with plain file I/O, not mapped, so its pages
  never count in the process's memory; entry lookups read the contiguous rows they need."""

  def __init__(self, gg, num_g, tmp, block_columns=None):
    self.fn = gg if callable(gg) else None
    self.array = None if callable(gg) else gg
    self.num_g = num_g
    self.fetch = int(block_columns or max(1, _FETCH_ELEMENTS // num_g))
    if self.fn is not None:
      self.path = f"{tmp}/gg_columns.npy"
      header = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                         shape=(num_g, num_g))
      self.offset = header.offset
      del header
      self.cached, self.cache = (0, 0), None
      self.filled = 0                                           # columns stored so far

  def columns(self, a, b):
    """GG[:, a:b]ᵀ, float32 [b - a, G]."""
    if self.fn is None:
      return np.asarray(self.array[:, a:b], np.float32).T
    c0, c1 = self.cached
    if not c0 <= a < b <= c1:
      if not c0 <= a <= c1 == self.filled:
        raise RuntimeError(f"rerank reads GG's column blocks in order; asked for {a}..{b} after "
                           f"{c0}..{c1}.")
      stop = min(self.num_g, max(b, c1 + self.fetch))
      block = np.ascontiguousarray(self.fn(c1, stop), np.float32)
      if block.shape != (stop - c1, self.num_g):
        raise ValueError(f"g_g_dist({c1}, {stop}) must return [{stop - c1}, {self.num_g}] "
                         f"(columns {c1}..{stop - 1} of GG, transposed); got {block.shape}.")
      with open(self.path, "r+b") as f:
        f.seek(self.offset + 4 * c1 * self.num_g)
        block.tofile(f)
      self.filled = stop
      self.cached = (a, stop)
      self.cache = np.concatenate([self.cache[a - c0:], block]) if a < c1 else block
      c0 = a
    return self.cache[a - c0:b - c0]

  def entries(self, j, i):
    """GG[j, i] for index arrays j, i (all columns must have been read by `columns`)."""
    if self.fn is None:
      return self.array[j, i]
    if self.filled != self.num_g:
      raise RuntimeError("rerank read GG entries before every column block was computed.")
    lo, hi = int(i.min()), int(i.max()) + 1
    rows = np.fromfile(self.path, np.float32, count=(hi - lo) * self.num_g,
                       offset=self.offset + 4 * lo * self.num_g).reshape(hi - lo, self.num_g)
    return rows[i - lo, j]


def _spans(n, split, block):
  """[start, stop) ranges of at most `block` covering 0..n, none straddling `split`."""
  for lo, hi in ((0, split), (split, n)):
    for start in range(lo, hi, block):
      yield start, min(hi, start + block)


def _columns(qg, qq, gg, start, stop):
  """D[:, start:stop]ᵀ as float32 [stop - start, N]; the range must not straddle P."""
  num_p = len(qg)
  if stop <= num_p:
    parts = (qq[:, start:stop].T, qg[start:stop])
  else:
    a, b = start - num_p, stop - num_p
    parts = (qg[:, a:b].T, gg.columns(a, b))
  out = np.concatenate([np.asarray(x, np.float32) for x in parts], axis=1)
  if np.isnan(out).any():
    raise ValueError("rerank's distances contain NaN (a diverged model or a bad score-to-"
                     "distance map); re-ranking needs finite distances.")
  return out


def _neighbours(qg, qq, gg, k):
  """Each row's k nearest (stable order) in the column-normalised, transposed D; column maxima."""
  n = sum(qg.shape)
  gg = gg if isinstance(gg, _Gallery) else _Gallery(gg, qg.shape[1], None)
  block = max(1, min(_BLOCK_ELEMENTS // n, n))
  ranks = np.empty((n, k), np.int32)
  col_max = np.empty(n, np.float32)
  for start, stop in _spans(n, len(qg), block):
    raw = _columns(qg, qq, gg, start, stop)
    if len(raw) < block:                                     # one shape, one compilation
      raw = np.concatenate([raw, np.repeat(raw[-1:], block - len(raw), axis=0)])
    peak = raw.max(axis=1)
    if not np.all(peak[:stop - start] > 0):
      raise ValueError("rerank divides each distance column by its maximum, so every column "
                       "needs a positive maximum (and no NaN); got a column maximum of "
                       f"{peak[~(peak > 0)][0]}.")
    col_max[start:stop] = peak[:stop - start]
    # Divided in NumPy: XLA multiplies by the reciprocal, which rounds (and so ties) differently.
    ranks[start:stop] = jax.device_get(_nearest(raw / peak[:, None], k))[:stop - start]
  return ranks, col_max


@functools.partial(jax.jit, static_argnums=1)
def _nearest(x, k):
  """Each row's k smallest in stable order: top_k keeps ties in index order; 0 - x turns -0.0
  into 0.0, which top_k would otherwise rank apart."""
  return jax.lax.top_k(0.0 - x, k)[1]


def _lookup(qg, qq, gg, col_max, i, j):
  """Working-matrix entries D[j, i] / max(D[:, i]) for index arrays i, j (float32)."""
  num_p = len(qg)
  gg = gg if isinstance(gg, _Gallery) else _Gallery(gg, qg.shape[1], None)
  out = np.empty(len(i), np.float32)
  iq, jq = i < num_p, j < num_p
  for sel, source, a, b in ((iq & jq, qq.__getitem__, j, i),
                            (~iq & jq, qg.__getitem__, j, i - num_p),
                            (iq & ~jq, qg.__getitem__, i, j - num_p),
                            (~iq & ~jq, lambda jj_ii: gg.entries(*jj_ii), j - num_p, i - num_p)):
    if sel.any():
      out[sel] = source((a[sel], b[sel]))
  return out / col_max[i]


def _reciprocal_mask(ranks, k):
  """[N, k] bool: ranks[i, m] is k-reciprocal, i.e. i is among the k nearest of ranks[i, m]."""
  n = len(ranks)
  out = np.empty((n, k), bool)
  step = max(1, _BLOCK_ELEMENTS // (k * k))
  for start in range(0, n, step):
    rows = np.arange(start, min(n, start + step))
    back = ranks[ranks[rows, :k], :k]                         # [b, k, k]
    out[rows] = (back == rows[:, None, None]).any(axis=-1)
  return out


def _expansion(ranks, reciprocal, half_reciprocal, rows):
  """(row, column) pairs of the expanded k-reciprocal set of each row, each pair once."""
  k, k_half = reciprocal.shape[1], half_reciprocal.shape[1]
  n = len(ranks)
  forward = ranks[rows, :k]
  members = np.where(reciprocal[rows], forward, n)            # n: not a member
  cand = ranks[forward, :k_half]                              # candidates' half-size sets
  cand_in = half_reciprocal[forward]
  overlap = (cand_in & (cand[..., None] == members[:, None, None, :]).any(-1)).sum(-1)
  grow = reciprocal[rows] & (overlap > 2.0 / 3 * cand_in.sum(-1))
  added = np.where(grow[..., None] & cand_in, cand, n).reshape(len(rows), -1)
  both = np.sort(np.concatenate([members, added], axis=1), axis=1)
  keep = both < n
  keep[:, 1:] &= both[:, 1:] != both[:, :-1]
  r, m = np.nonzero(keep)
  return rows[r], both[r, m]


def _weights(rows, dist):
  """exp(-d) normalised over each row's entries (rows sorted); float32 like the reference."""
  w = np.exp(-dist)
  total = np.bincount(rows - rows[0], weights=w)[rows - rows[0]] if len(rows) else w
  return (w / total).astype(np.float32)


def _query_expansion(v, nearest):
  """Each row replaced by the mean of the rows of its `nearest` items."""
  n, k = nearest.shape
  pick = sparse.csr_matrix((np.ones(n * k, np.float32), (np.repeat(np.arange(n), k),
                                                         nearest.ravel())), shape=(n, n))
  v = (pick @ v).tocsr()
  v.data /= np.float32(k)
  return v


def _final(v, qg, col_max_q, lambda_value):
  """(1 - λ)·Jaccard(query rows, gallery rows) + λ·normalised QG, in steps of bounded work."""
  num_p, num_g = qg.shape
  vq = v[:num_p]
  vg = v[num_p:].tocsc()                                      # column k → gallery rows using k
  col_nnz = np.diff(vg.indptr)
  work = np.bincount(np.repeat(np.arange(num_p), np.diff(vq.indptr)),
                     weights=col_nnz[vq.indices], minlength=num_p)
  out = np.empty((num_p, num_g), np.float32)
  for q0, q1 in _steps(work, _PAIRS_PER_STEP, max(1, _BLOCK_ELEMENTS // num_g)):
    shared = _min_overlap(vq[q0:q1], vg, num_g)
    jaccard = (1 - shared / (2 - shared)).astype(np.float32)
    direct = np.asarray(qg[q0:q1], np.float32) / col_max_q[q0:q1, None]
    out[q0:q1] = jaccard * (1 - lambda_value) + direct * lambda_value
  return out


def _steps(work, budget, max_rows):
  """Consecutive row ranges whose summed work is ~budget (at least one row, at most max_rows)."""
  total = np.cumsum(work)
  start = 0
  while start < len(work):
    before = total[start - 1] if start else 0
    stop = int(np.searchsorted(total, before + budget, side="right"))
    stop = min(max(stop, start + 1), start + max_rows, len(work))
    yield start, stop
    start = stop


def _min_overlap(vq, vg, num_g):
  """Σ_k min(vq[i, k], vg[j, k]) for each query row i and gallery row j (float64 [b, G])."""
  b = vq.shape[0]
  q_rows = np.repeat(np.arange(b), np.diff(vq.indptr))
  lens = np.diff(vg.indptr)[vq.indices]
  starts = np.repeat(vg.indptr[vq.indices] - np.cumsum(lens) + lens, lens)
  pos = starts + np.arange(lens.sum())
  shared = np.minimum(np.repeat(vq.data, lens), vg.data[pos])
  return np.bincount(np.repeat(q_rows, lens) * num_g + vg.indices[pos], weights=shared,
                     minlength=b * num_g).reshape(b, num_g)
