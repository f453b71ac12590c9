"""CMC, mAP and mINP of a query × gallery score matrix (docs/README.md, evaluation protocol).

No [P, G] temporary and no argsort: each block of queries is value-sorted (one copy of the
block), and only the gallery entries that share the query's id (matches and same-camera junk)
are placed in the ranking, by binary search in the sorted rows. Every metric needs nothing
else: an entry's rank is the number of entries with a higher score, plus the equal-scored ones
earlier in gallery order, minus the junk among them. Blocks are sorted on a few threads (NumPy
sorts release the GIL), so peak memory is about threads × block × itemsize beyond `scores`.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Scores per query block: one sorted copy of the block is the only large temporary.
_BLOCK_ELEMENTS = 1 << 23


def evaluate_ranking(scores, query_ids, gallery_ids, query_cams, gallery_cams, max_rank=50, *,
                     query_block=None) -> dict:
  """Single-query re-identification metrics; scores [P, G], higher = more similar.

  Gallery entries with the query's id AND camera are dropped per query; queries with no true
  match left are skipped. The ranked list is a stable sort on -score, so ties keep gallery order;
  CMC and mINP use that order. AP follows sklearn `average_precision_score`: tied scores are one
  threshold, so AP does not depend on the order within a tie. INP = matches / (1 + position of
  the last match), positions counted in the filtered list (torchreid).

  Returns dict with `cmc` (float64 [max_rank]: fraction of valid queries whose first match is
  within rank r + 1; flat at 1 beyond the gallery size), `mAP`, `mINP` (floats in [0, 1]) and
  `num_valid_queries`. `query_block` (queries per block) defaults to ~8M scores per block.
  `scores` may be a np.memmap: it is read block by block.
  """
  scores = scores if isinstance(scores, np.ndarray) else np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be a 2-D [P, G] array; got shape {scores.shape}.")
  num_p, num_g = scores.shape
  query_ids = _vector(query_ids, num_p, "query_ids", "P", scores.shape)
  query_cams = _vector(query_cams, num_p, "query_cams", "P", scores.shape)
  gallery_ids = _vector(gallery_ids, num_g, "gallery_ids", "G", scores.shape)
  gallery_cams = _vector(gallery_cams, num_g, "gallery_cams", "G", scores.shape)
  if int(max_rank) < 1:
    raise ValueError(f"max_rank must be >= 1; got {max_rank}.")
  max_rank = int(max_rank)
  if num_p == 0 or num_g == 0:
    raise ValueError(f"scores is empty (shape {scores.shape}); nothing to evaluate.")

  block = query_block or max(1, _BLOCK_ELEMENTS // num_g)
  gallery = _Gallery(gallery_ids, gallery_cams)
  rank = lambda i: _rank_block(scores[i:i + block], query_ids[i:i + block],
                               query_cams[i:i + block], gallery, i)
  starts = range(0, num_p, block)
  with ThreadPoolExecutor(min(_threads(), len(starts))) as pool:
    blocks = list(pool.map(rank, starts))
  first, last, num_pos, ap = (np.concatenate(x) for x in zip(*blocks))

  valid = num_pos > 0
  n = int(valid.sum())
  if n == 0:
    raise ValueError("No query has a true match in the gallery (after dropping same-id, "
                     "same-camera entries); check the ids and cameras passed.")
  hist = np.bincount(np.minimum(first[valid], max_rank), minlength=max_rank + 1)[:max_rank]
  return {
      "cmc": np.cumsum(hist) / n,
      "mAP": float(ap[valid].mean()),
      "mINP": float((num_pos[valid] / (last[valid] + 1.0)).mean()),
      "num_valid_queries": n,
  }


def top_k(scores, k, *, query_block=None) -> tuple[np.ndarray, np.ndarray]:
  """Each query's k best gallery entries: (indices int32 [P, k'], scores [P, k']), k' = min(k, G),
  in ranking order (ties in gallery order, as evaluate_ranking ranks); nothing is filtered."""
  scores = scores if isinstance(scores, np.ndarray) else np.asarray(scores)
  if scores.ndim != 2 or min(scores.shape) == 0 or k < 1:
    raise ValueError(f"top_k needs a non-empty [P, G] matrix and k >= 1; got {scores.shape}, "
                     f"k={k}.")
  block = query_block or max(1, _BLOCK_ELEMENTS // scores.shape[1])
  indices, values = [], []
  for i in range(0, len(scores), block):
    x = np.asarray(scores[i:i + block])
    _check_no_nan(x, i)
    j = stable_smallest(-x, k)
    indices.append(j)
    values.append(np.take_along_axis(x, j, axis=1))
  return np.concatenate(indices), np.concatenate(values)


def _check_no_nan(block, first_row: int) -> None:
  """ValueError naming the first query row with a NaN score (NaN has no rank)."""
  bad = np.isnan(block).any(axis=1)
  if bad.any():
    raise ValueError(f"scores contain NaN (first in query row {first_row + int(np.argmax(bad))}): "
                     "NaN has no rank; a diverged model gives these, so check the model first.")


def stable_smallest(x, k) -> np.ndarray:
  """int32 [n, min(k, m)] column indices of each row's k smallest values of x [n, m], equal to
  np.argsort(x, kind="stable")[:, :k] (ties by column index) at argpartition cost."""
  x = np.asarray(x)
  n, m = x.shape
  k = min(int(k), m)
  if k >= m or m <= 64:
    return np.argsort(x, axis=1, kind="stable")[:, :k].astype(np.int32)
  part = np.argpartition(x, k - 1, axis=1)[:, :k]
  part.sort(axis=1)                       # index order, so the stable value sort breaks ties
  vals = np.take_along_axis(x, part, axis=1)
  order = np.argsort(vals, axis=1, kind="stable")
  out = np.take_along_axis(part, order, axis=1).astype(np.int32)
  # argpartition picks arbitrary members of a tie that straddles the k-th place: redo those rows.
  kth = np.take_along_axis(vals, order[:, -1:], axis=1)
  straddle = np.flatnonzero((x <= kth).sum(axis=1) > k)
  if straddle.size:
    out[straddle] = np.argsort(x[straddle], axis=1, kind="stable")[:, :k]
  return out


def _vector(x, n, name, dim, shape):
  x = np.asarray(x)
  if x.shape != (n,):
    raise ValueError(f"{name} must have shape ({dim},) = ({n},) to match scores [P, G] = "
                     f"{shape}; got {x.shape}.")
  return x


def _threads():
  return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1))


class _Gallery:
  """Gallery indices grouped by id, for listing each query's same-id entries."""

  def __init__(self, ids, cams):
    self.by_id = np.argsort(ids, kind="stable")
    self.sorted_ids = ids[self.by_id]
    self.cams = cams

  def same_id(self, query_ids):
    """(query row, gallery index) of every gallery entry with the query's id, row-major."""
    lo = np.searchsorted(self.sorted_ids, query_ids, side="left")
    counts = np.searchsorted(self.sorted_ids, query_ids, side="right") - lo
    rows = np.repeat(np.arange(len(query_ids)), counts)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, self.by_id[np.repeat(lo, counts) + within]


def _rank_block(scores, qids, qcams, gallery, first_row: int = 0):
  """Per query: 0-based filtered positions of the first and last match, #matches, AP."""
  scores = np.asarray(scores)
  _check_no_nan(scores, first_row)
  if not np.issubdtype(scores.dtype, np.floating):
    scores = scores.astype(np.float64)
  b, g = scores.shape
  srt = np.sort(scores, axis=1)
  if np.isnan(srt[:, -1]).any():               # NaN sorts last
    raise ValueError("scores contains NaN; the ranking is undefined.")

  # Same-id entries in ranking order: by query, score descending, gallery index.
  rows, cols = gallery.same_id(qids)
  s = scores[rows, cols]
  order = np.lexsort((cols, -s, rows))
  rows, cols, s = rows[order], cols[order], s[order]
  junk = gallery.cams[cols] == qcams[rows]
  match = ~junk
  n_ge = g - _search(srt, rows, s, "left")     # gallery entries scoring >= s
  n_gt = g - _search(srt, rows, s, "right")    # ... > s

  # Counts among a row's same-id entries: before each entry, and up to the end of its tie.
  row_start = np.searchsorted(rows, rows, side="left")
  new_tie = np.ones(len(rows), bool)
  new_tie[1:] = (rows[1:] != rows[:-1]) | (s[1:] != s[:-1])
  tie_end = np.flatnonzero(np.r_[new_tie[1:], True])[np.cumsum(new_tie) - 1]
  match_incl, junk_incl = np.cumsum(match), np.cumsum(junk)
  matches_ge = match_incl[tie_end] - (match_incl - match)[row_start]
  junk_ge = junk_incl[tie_end] - (junk_incl - junk)[row_start]
  junk_before = (junk_incl - junk) - (junk_incl - junk)[row_start]

  num_pos = np.bincount(rows[match], minlength=b)
  precision = matches_ge[match] / (n_ge[match] - junk_ge[match])
  ap = np.bincount(rows[match], weights=precision, minlength=b) / np.maximum(num_pos, 1)

  # Filtered position = entries ranked before it (higher score, or equal and earlier) - junk.
  position = n_gt - junk_before
  m = np.flatnonzero(match)
  changes = rows[m][1:] != rows[m][:-1]
  is_first, is_last = np.r_[True, changes][:len(m)], np.r_[changes, True][:len(m)]
  first, last = np.zeros(b, np.int64), np.zeros(b, np.int64)
  for out, ends in ((first, m[is_first]), (last, m[is_last])):
    out[rows[ends]] = position[ends] + _equal_before(scores, rows, cols, s, n_ge - n_gt, ends)
  return first, last, num_pos, ap


def _equal_before(scores, rows, cols, s, num_equal, entries):
  """For each listed entry: gallery entries with exactly its score and a smaller index."""
  out = np.zeros(len(entries), np.int64)
  tied = np.flatnonzero(num_equal[entries] > 1)    # only scanned where a tie exists
  if tied.size:
    e = entries[tied]
    row_scores = scores[rows[e]]
    out[tied] = ((row_scores == s[e][:, None])
                 & (np.arange(scores.shape[1]) < cols[e][:, None])).sum(axis=1)
  return out


def _search(sorted_rows, rows, values, side):
  """np.searchsorted(sorted_rows[r], v, side) for every (r, v) pair, as one vectorised search."""
  n = sorted_rows.shape[1]
  lo = np.zeros(len(rows), np.int64)
  hi = np.full(len(rows), n, np.int64)
  for _ in range(n.bit_length()):
    mid = (lo + hi) // 2
    v = sorted_rows[rows, np.minimum(mid, n - 1)]
    right = (v < values) if side == "left" else (v <= values)
    open_ = lo < hi
    lo = np.where(open_ & right, mid + 1, lo)
    hi = np.where(open_ & ~right, mid, hi)
  return lo
