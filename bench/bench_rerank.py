"""k-reciprocal re-ranking at Market-1501 size: jaxreid.rerank (blocked, sparse) vs a direct
dense NumPy implementation of the authors' algorithm ((P+G)² distances, full argsort, dense V),
on the same distances.

Each implementation runs in its own child process (peak RSS is its own); the parent checks that
both gave the same distances. Prints one JSON line per implementation and a summary line.

  python bench/bench_rerank.py            # P = 3,368 queries, G = 15,913 gallery
  python bench/bench_rerank.py --quick    # P = 300, G = 1,500
"""
import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

from harness import peak_rss_mb, run_impl, timed

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queries", type=int, default=3368)
  parser.add_argument("--gallery", type=int, default=15913)
  parser.add_argument("--ids", type=int, default=751)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--noise", type=float, default=1.0, help="feature noise around each id")
  parser.add_argument("--k1", type=int, default=20)
  parser.add_argument("--k2", type=int, default=6)
  parser.add_argument("--lambda-value", type=float, default=0.3)
  parser.add_argument("--direct-sort", choices=["stable", "quicksort"], default="stable",
                      help="the direct version's argsort: stable ranks ties as jaxreid does "
                      "(equal results); quicksort is the authors' (ties in arbitrary order)")
  parser.add_argument("--repeats", type=int, default=1, help="timed runs (the first includes "
                      "jaxreid's compilation)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="P = 300, G = 1,500, 100 ids")
  parser.add_argument("--impl", choices=["jaxreid", "direct"], help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.queries, args.gallery, args.ids = 300, 1500, 100
  return args


def make_distances(args):
  """QG, QQ, GG = 1 - sigmoid(s/10) of matcher-like scores s = 30·cos between noisy id features;
  built in row chunks so no temporary outgrows the outputs."""
  rng = np.random.default_rng(args.seed)
  n = args.queries + args.gallery
  centres = rng.standard_normal((args.ids, args.dim), dtype=np.float32)
  x = centres[rng.integers(0, args.ids, n)]
  x += args.noise * rng.standard_normal(x.shape, dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q, g = x[:args.queries], x[args.queries:]

  def dist(a, b):
    out = np.empty((len(a), len(b)), np.float32)
    for i in range(0, len(a), 512):
      out[i:i + 512] = 1 / (1 + np.exp(3 * (a[i:i + 512] @ b.T)))   # = 1 - sigmoid(30·cos/10)
    return out

  return dist(q, g), dist(q, q), dist(g, g)


def direct_rerank(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3, sort="stable"):
  """The authors' algorithm on dense (P+G)² arrays (distances not squared)."""
  p = len(q_g_dist)
  d = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                      np.concatenate([q_g_dist.T, g_g_dist], axis=1)]).astype(np.float32)
  d = np.transpose(d / np.max(d, axis=0))
  n = len(d)
  ranks = np.argsort(d, axis=1, kind=sort).astype(np.int32)
  half = int(np.around(k1 / 2)) + 1
  v = np.zeros_like(d)
  for i in range(n):
    forward = ranks[i, :k1 + 1]
    recip = forward[np.any(ranks[forward, :k1 + 1] == i, axis=1)]
    expanded = recip
    for c in recip:
      c_forward = ranks[c, :half]
      c_recip = c_forward[np.any(ranks[c_forward, :half] == c, axis=1)]
      if len(np.intersect1d(c_recip, recip)) > 2 / 3 * len(c_recip):
        expanded = np.append(expanded, c_recip)
    expanded = np.unique(expanded)
    w = np.exp(-d[i, expanded])
    v[i, expanded] = w / np.sum(w)
  d = d[:p]
  if k2 != 1:
    expanded_v = np.zeros_like(v)
    for i in range(n):
      expanded_v[i] = np.mean(v[ranks[i, :k2]], axis=0)
    v = expanded_v
  del ranks
  users = [np.flatnonzero(v[:, j]) for j in range(n)]          # rows using item j
  jaccard = np.zeros_like(d)
  for i in range(p):
    shared = np.zeros(n, np.float32)
    for j in np.flatnonzero(v[i]):
      shared[users[j]] += np.minimum(v[i, j], v[users[j], j])
    jaccard[i] = 1 - shared / (2 - shared)
  return (jaccard * (1 - lambda_value) + d * lambda_value)[:, p:]


def run_child(args):
  qg, qq, gg = make_distances(args)
  if args.impl == "jaxreid":
    sys.path.insert(0, str(REPO))
    from jaxreid.eval.rerank import rerank
    run = lambda: rerank(qg, qq, gg, args.k1, args.k2, args.lambda_value)
  else:
    run = lambda: direct_rerank(qg, qq, gg, args.k1, args.k2, args.lambda_value,
                                args.direct_sort)
  rss_before = peak_rss_mb()
  out, first, wall = timed(run, max(0, args.repeats - 1))
  np.save(args.out, out)
  print(json.dumps({
      "impl": {"jaxreid": "jaxreid_blocked",
               "direct": f"numpy_dense_{args.direct_sort}"}[args.impl],
      "P": args.queries, "G": args.gallery, "wall_s": round(wall, 2),
      "first_call_s": round(first, 2),
      "peak_rss_mb": round(peak_rss_mb()),
      "rss_before_run_mb": round(rss_before),
      "input_mb": round((qg.nbytes + qq.nbytes + gg.nbytes) / 2**20)}), flush=True)


def main(argv=None):
  args = parse_args(argv)
  if args.impl:
    return run_child(args)
  argv = list(argv if argv is not None else sys.argv[1:])
  results, outputs = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for impl in ("jaxreid", "direct"):
      results[impl], outputs[impl] = run_impl(__file__, argv, impl, tmp)
  ours, base = results["jaxreid"], results["direct"]
  added = lambda r: r["peak_rss_mb"] - r["rss_before_run_mb"]
  print(json.dumps({
      "summary": "rerank", "P": args.queries, "G": args.gallery,
      "speedup_jaxreid_over_direct": round(base["wall_s"] / ours["wall_s"], 2),
      "peak_rss_ratio_direct_over_jaxreid": round(base["peak_rss_mb"] / ours["peak_rss_mb"], 2),
      "added_rss_ratio_direct_over_jaxreid": round(added(base) / max(1, added(ours)), 2),
      "max_abs_diff": float(np.abs(outputs["jaxreid"] - outputs["direct"]).max()),
      "same_ranking_fraction": float(np.mean(np.all(
          np.argsort(outputs["jaxreid"], axis=1, kind="stable")[:, :50]
          == np.argsort(outputs["direct"], axis=1, kind="stable")[:, :50], axis=1)))}))


if __name__ == "__main__":
  main()
