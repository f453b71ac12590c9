"""CMC, mAP and mINP of a query × gallery score matrix (METHODS.md, evaluation protocol).

Queries are processed in blocks, each block with whole-array NumPy operations, so memory is
O(block × G) and there is no Python loop per query.
"""
import numpy as np

# Scores per query block; the block's temporaries take ~130 bytes per score.
_BLOCK_ELEMENTS = 1 << 21


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
  `num_valid_queries`. `query_block` (queries per block) defaults to ~2M scores per block.
  """
  scores = np.asarray(scores)
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
  if not np.issubdtype(scores.dtype, np.floating):
    scores = scores.astype(np.float64)
  if np.isnan(scores).any():
    raise ValueError("scores contains NaN; the ranking is undefined.")

  if num_p == 0 or num_g == 0:
    raise ValueError(f"scores is empty (shape {scores.shape}); nothing to evaluate.")
  block = query_block or max(1, _BLOCK_ELEMENTS // max(num_g, 1))
  blocks = [_rank_block(scores[i:i + block], query_ids[i:i + block], query_cams[i:i + block],
                        gallery_ids, gallery_cams) for i in range(0, num_p, block)]
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


def _vector(x, n, name, dim, shape):
  x = np.asarray(x)
  if x.shape != (n,):
    raise ValueError(f"{name} must have shape ({dim},) = ({n},) to match scores [P, G] = "
                     f"{shape}; got {x.shape}.")
  return x


def _rank_block(scores, qids, qcams, gids, gcams):
  """Per query: 0-based filtered positions of the first and last match, #matches, AP."""
  b, g = scores.shape
  rows = np.arange(b)[:, None]
  order = np.argsort(-scores, axis=1, kind="stable")
  s = scores[rows, order]
  same_id = gids[order] == qids[:, None]
  keep = ~(same_id & (gcams[order] == qcams[:, None]))
  match = same_id & keep
  kept_before = np.cumsum(keep, axis=1, dtype=np.int32)      # filtered list length so far
  matches_before = np.cumsum(match, axis=1, dtype=np.int32)
  num_pos = matches_before[:, -1]
  has = num_pos > 0

  first_idx = np.argmax(match, axis=1)
  last_idx = g - 1 - np.argmax(match[:, ::-1], axis=1)
  first = np.where(has, kept_before[np.arange(b), first_idx] - 1, 0)
  last = np.where(has, kept_before[np.arange(b), last_idx] - 1, 0)

  # sklearn AP: precision evaluated once per distinct score, at the end of its tie group. Dropped
  # entries inside a group add nothing to either count, so groups are runs of equal sorted scores.
  boundary = np.ones((b, g), dtype=bool)
  boundary[:, :-1] = s[:, 1:] != s[:, :-1]
  group_end = np.where(boundary, np.arange(g, dtype=np.int32), np.int32(g))
  group_end = np.minimum.accumulate(group_end[:, ::-1], axis=1)[:, ::-1]
  precision = matches_before[rows, group_end] / np.maximum(kept_before[rows, group_end], 1)
  ap = np.where(match, precision, 0.0).sum(axis=1) / np.maximum(num_pos, 1)
  return first, last, num_pos, ap
