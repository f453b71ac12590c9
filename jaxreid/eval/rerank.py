"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) without any (P+G)² temporary.

Only the first k1 + 1 neighbours of every item, a few sparse weights per item and the query
rows' Jaccard distances are ever needed, so the (P+G)² matrices of the authors' dense code
(distances, full argsort, V, query-expanded V) are replaced by a neighbour table, sparse V and
blocks of rows read from the inputs.
"""
import functools

import jax
import numpy as np
from scipy import sparse

# Elements of the (P+G)² working matrix (or of the [P, G] output) per block.
_BLOCK_ELEMENTS = 1 << 21
# (query, gallery) weight pairs per Jaccard step.
_PAIRS_PER_STEP = 1 << 20


def rerank(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3) -> np.ndarray:
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
  """
  qg, qq, gg, k1, k2 = _check(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)
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
  qg, qq, gg = (x if isinstance(x, np.ndarray) else np.asarray(x) for x in (qg, qq, gg))
  if qg.ndim != 2 or qq.shape != (len(qg),) * 2 or gg.shape != (qg.shape[1],) * 2:
    raise ValueError(f"rerank needs q_g_dist [P, G], q_q_dist [P, P], g_g_dist [G, G]; got "
                     f"{qg.shape}, {qq.shape}, {gg.shape}.")
  if 0 in qg.shape:
    raise ValueError(f"rerank needs at least one query and one gallery item; got {qg.shape}.")
  if int(k1) != k1 or int(k2) != k2 or k1 < 1 or k2 < 1:
    raise ValueError(f"k1 and k2 must be integers >= 1; got k1={k1}, k2={k2}.")
  if not 0 <= lambda_value <= 1:
    raise ValueError(f"lambda_value weighs the original distance against the Jaccard distance "
                     f"and must lie in [0, 1]; got {lambda_value}.")
  return qg, qq, gg, int(k1), int(k2)


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
    parts = (qg[:, a:b].T, gg[:, a:b].T)
  out = np.concatenate([np.asarray(x, np.float32) for x in parts], axis=1)
  if np.isnan(out).any():
    raise ValueError("rerank's distances contain NaN (a diverged model or a bad score-to-"
                     "distance map); re-ranking needs finite distances.")
  return out


def _neighbours(qg, qq, gg, k):
  """Each row's k nearest (stable order) in the column-normalised, transposed D; column maxima."""
  n = sum(qg.shape)
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
  out = np.empty(len(i), np.float32)
  iq, jq = i < num_p, j < num_p
  for sel, source, a, b in ((iq & jq, qq, j, i), (~iq & jq, qg, j, i - num_p),
                            (iq & ~jq, qg, i, j - num_p), (~iq & ~jq, gg, j - num_p, i - num_p)):
    if sel.any():
      out[sel] = source[a[sel], b[sel]]
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
