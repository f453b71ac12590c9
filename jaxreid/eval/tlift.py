"""Temporal Lifting, TLift (QAConv paper, Sec. 4; docs/README.md), vectorised per camera pair.

Per (query camera, gallery camera) block the queries are sorted by time, so each query's
co-occurring probes are one contiguous run of rows. The K-th largest score of a run is found
among each row's own top K (ties included), which always contain it; the pivots' time kernels
are evaluated once per distinct pivot image and summed with a count matrix product.
"""
import numpy as np

# Pivot candidates × gallery images per kernel matrix.
_KERNEL_ELEMENTS = 1 << 23


def tlift(scores, gallery_cams, gallery_times, query_cams, query_times, tau=100.0, sigma=200.0,
          K=10, alpha=0.2) -> np.ndarray:
  """Lifted similarities [P, G] = (w + α)·scores, for appearance similarities in [0, 1].

  For query i of camera a and each gallery camera c: the queries of camera a with
  |t_j - t_i| < τ (i included) are i's co-occurring probes; thr is the K-th largest of all their
  scores against camera c (the smallest if there are fewer than K); every (probe, gallery image)
  score >= thr makes that gallery image a pivot, counted once per such score; for each gallery
  image g of camera c, w_ig = mean over pivots p of exp(-(t_g - t_p)² / σ²). Times in seconds.
  The output has the scores' float dtype (at least float32). Raises ValueError when a time is
  missing (NaN): datasets without times (CUHK03, MSMT17) cannot use TLift.
  """
  scores = scores if isinstance(scores, np.ndarray) else np.asarray(scores)
  if scores.ndim != 2 or 0 in scores.shape:
    raise ValueError(f"tlift needs a non-empty [P, G] score matrix; got shape {scores.shape}.")
  num_p, num_g = scores.shape
  q_cams, q_times = _vector(query_cams, num_p, "query_cams"), _vector(query_times, num_p,
                                                                       "query_times", float)
  g_cams, g_times = _vector(gallery_cams, num_g, "gallery_cams"), _vector(gallery_times, num_g,
                                                                          "gallery_times", float)
  missing_q, missing_g = int(np.isnan(q_times).sum()), int(np.isnan(g_times).sum())
  if missing_q or missing_g:
    raise ValueError(f"TLift needs a time for every image; {missing_q} query and {missing_g} "
                     "gallery times are missing (NaN). Datasets without times (e.g. CUHK03, "
                     "MSMT17) cannot use TLift.")
  if not (tau > 0 and sigma > 0 and K >= 1):
    raise ValueError(f"tlift needs tau > 0, sigma > 0, K >= 1; got {tau}, {sigma}, {K}.")

  out = np.empty(scores.shape, np.result_type(scores.dtype, np.float32))
  for qc in np.unique(q_cams):
    q_idx = np.flatnonzero(q_cams == qc)
    q_idx = q_idx[np.argsort(q_times[q_idx], kind="stable")]
    lo, hi = _windows(q_times[q_idx], tau)
    for gc in np.unique(g_cams):
      g_idx = np.flatnonzero(g_cams == gc)
      block = np.ix_(q_idx, g_idx)
      s = np.asarray(scores[block])
      if s.size and not (s.min() >= -1e-6 and s.max() <= 1 + 1e-6):   # NaN fails both
        raise ValueError(f"tlift lifts appearance similarities in [0, 1]; got values in "
                         f"[{np.nanmin(s):g}, {np.nanmax(s):g}]{' and NaN' if np.isnan(s).any() else ''}"
                         " (map logits first, e.g. sigmoid(s / 10), or use 1 - a re-ranked "
                         "distance).")
      out[block] = (_weights(s, lo, hi, g_times[g_idx], sigma, int(K)) + alpha) * s
  return out


def _vector(x, n, name, dtype=None):
  x = np.asarray(x, dtype)
  if x.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},) to match the scores; got {x.shape}.")
  return x


def _windows(t, tau):
  """For times t sorted ascending: [lo, hi) of the rows j with |t_j - t_i| < tau, per row i."""
  lo = np.searchsorted(t, t - tau, side="right")
  hi = np.searchsorted(t, t + tau, side="left")
  # The searches compare t_j with t_i ± tau; the definition compares |t_j - t_i| with tau, and
  # the two can round differently. Move each bound until it agrees with the definition.
  n = len(t)

  def inside(j):
    return (j >= 0) & (j < n) & (np.abs(t[np.clip(j, 0, n - 1)] - t) < tau)

  while (m := inside(lo - 1)).any():
    lo[m] -= 1
  while (m := ~inside(lo)).any():       # stops at i itself at the latest
    lo[m] += 1
  while (m := inside(hi)).any():
    hi[m] += 1
  while (m := ~inside(hi - 1)).any():
    hi[m] -= 1
  return lo, hi


def _weights(s, lo, hi, g_times, sigma, k):
  """Temporal weights w [nq, ng] of one camera pair; s rows sorted by query time."""
  nq, ng = s.shape
  kk = min(k, ng)
  row_kth = -np.partition(-s, kk - 1, axis=1)[:, kk - 1]
  rows, cols = np.nonzero(s >= row_kth[:, None])          # each row's top K, ties included
  vals = s[rows, cols]
  indptr = np.searchsorted(rows, np.arange(nq + 1))
  first, end = indptr[lo], indptr[hi]                      # a query's candidates: [first, end)
  w = np.empty((nq, ng))
  budget = max(_KERNEL_ELEMENTS // ng, int((end - first).max()))
  start = 0
  while start < nq:
    stop = max(start + 1, int(np.searchsorted(end, first[start] + budget, side="right")))
    w[start:stop] = _chunk_weights(vals, cols, first[start:stop], end[start:stop], g_times,
                                   sigma, k)
    start = stop
  return w


def _chunk_weights(vals, cols, first, end, g_times, sigma, k):
  length = end - first
  width = int(length.max())
  pos = first[:, None] + np.arange(width)
  valid = np.arange(width) < length[:, None]
  v = np.where(valid, vals[np.minimum(pos, len(vals) - 1)], -np.inf)
  ranked = -np.sort(-v, axis=1)
  thr = ranked[np.arange(len(v)), np.minimum(k, length) - 1]
  q, j = np.nonzero(valid & (v >= thr[:, None]))
  pivots, which = np.unique(cols[pos[q, j]], return_inverse=True)
  counts = np.bincount(q * len(pivots) + which, minlength=len(v) * len(pivots))
  counts = counts.reshape(len(v), len(pivots)).astype(np.float64)
  kernel = np.exp(-np.square(g_times[None, :] - g_times[pivots][:, None]) / sigma ** 2)
  return counts @ kernel / counts.sum(axis=1, keepdims=True)
