"""NFormer inference at MSMT17 scale: jaxreid.methods.nformer.model (reciprocal neighbours and LAA + RNS by
gather, in row blocks, never N×N) vs a dense-affinity NumPy formulation (N×N similarity, N×N
reciprocal mask, N×N masked softmax per head), same random weights (4 blocks, d=256, 2 heads).

jaxreid runs at N = 93,820 (MSMT17 query 11,659 + gallery 82,161, queries not attending to other
queries). The dense form runs under an address-space budget (RLIMIT_AS, default 8 GB) at the
largest of --dense-sizes that fits; jaxreid runs again at that size for the ratio and the check
that both give the same outputs. Each run is its own child process (its own peak RSS). Prints
one JSON line per run and a summary line.

  python bench/bench_nformer_scale.py            # N = 93,820; dense tries 30k, 20k, 10k, 5k
  python bench/bench_nformer_scale.py --quick    # N = 3,000; dense at 2,000
"""
import argparse
import json
import math
import pathlib
import resource
import sys
import tempfile

import numpy as np

from harness import peak_rss_mb, run_impl, timed

REPO = pathlib.Path(__file__).resolve().parents[1]
MSMT_QUERY_FRACTION = 11659 / 93820


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=93820, help="set size for jaxreid")
  parser.add_argument("--dense-sizes", default="30000,20000,10000,5000",
                      help="sizes tried for the dense form, the first that fits is compared")
  parser.add_argument("--budget-gb", type=float, default=8.0, help="dense form's RLIMIT_AS")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--ffn", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--k", type=int, default=20)
  parser.add_argument("--landmarks", type=int, default=5)
  parser.add_argument("--ids", type=int, default=4000, help="identities the features cluster on")
  parser.add_argument("--repeats", type=int, default=1,
                      help="timed runs (the first includes jaxreid's compilation)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="N = 3,000; dense at 2,000")
  parser.add_argument("--impl", choices=["jaxreid", "dense"], help=argparse.SUPPRESS)
  parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.n, args.dense_sizes, args.ids = 3000, "2000", 200
  return args


def make_problem(args, n):
  """L2-normalised features clustered around ids, random NFormer weights (N(0, 0.02) like the
  official init, LayerNorm 1/0), landmark rows, and the number of query rows."""
  rng = np.random.default_rng(args.seed)
  centres = rng.standard_normal((args.ids, args.dim), dtype=np.float32)
  x = centres[rng.integers(0, args.ids, n)]
  x += rng.standard_normal(x.shape, dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  d, f = args.dim, args.ffn
  lin = lambda i, o: {"kernel": 0.02 * rng.standard_normal((i, o), dtype=np.float32),
                      "bias": np.zeros(o, np.float32)}
  ln = lambda: {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)}
  params = {f"h_{i}": {"attn": {"c_attn": lin(d, 3 * d), "c_proj": lin(d, d)}, "ln_1": ln(),
                       "mlp": {"c_fc": lin(d, f), "c_proj": lin(f, d)}, "ln_2": ln()}
            for i in range(args.layers)}
  landmarks = rng.choice(n, args.landmarks, replace=False)
  return x, params, landmarks, int(round(n * MSMT_QUERY_FRACTION))


def dense_nformer(params, x, landmarks, num_queries, k, heads, eps=1e-5):
  """The dense-affinity formulation in NumPy float32: N×N cosine similarity → top-k →
  N×N reciprocal mask (queries masked from other queries) → per block and head the N×N LAA
  affinity, masked softmax (in place) and aggregation."""
  n, d = x.shape
  dh = d // heads
  s = x @ x.T
  np.fill_diagonal(s, np.inf)
  member = np.zeros((n, n), bool)
  for i in range(0, n, 1024):                                  # argpartition's int64 in chunks
    top = np.argpartition(-s[i:i + 1024], k - 1, axis=1)[:, :k]
    member[np.arange(i, min(i + 1024, n))[:, None], top] = True
  del s
  drop = ~(member & member.T)
  del member
  drop[:num_queries, :num_queries] = True
  drop[np.arange(num_queries), np.arange(num_queries)] = False
  ln = lambda y, p: ((y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + eps)
                     * p["scale"] + p["bias"])
  lin = lambda y, p: y @ p["kernel"] + p["bias"]        # (all float32: no NumPy float64 scalars)
  gelu = lambda y: 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
  for i in range(len(params)):
    p = params[f"h_{i}"]
    q, kk, v = np.split(lin(x, p["attn"]["c_attn"]), 3, axis=1)
    out = []
    for h in range(heads):
      sl = slice(h * dh, (h + 1) * dh)
      qh, kh = q[:, sl], kk[:, sl]
      a = (qh @ kh[landmarks].T) @ (qh[landmarks] @ kh.T)       # N×N
      a *= 1 / math.sqrt(dh)
      np.putmask(a, drop, -np.inf)
      a -= a.max(1, keepdims=True)
      np.exp(a, out=a)
      a /= a.sum(1, keepdims=True)
      out.append(a @ v[:, sl])
      del a
    n1 = ln(x + lin(np.concatenate(out, 1), p["attn"]["c_proj"]), p["ln_1"])
    x = ln(n1 + lin(gelu(lin(n1, p["mlp"]["c_fc"])), p["mlp"]["c_proj"]), p["ln_2"])
  return x


def run_child(args):
  n = args.size
  record = {"impl": {"jaxreid": "jaxreid_gathered", "dense": "numpy_dense_affinity"}[args.impl],
            "N": n}
  if args.impl == "dense":
    limit = int(args.budget_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    record["budget_gb"] = args.budget_gb
  try:
    x, params, landmarks, num_queries = make_problem(args, n)
    record["num_queries"] = num_queries
    if args.impl == "jaxreid":
      sys.path.insert(0, str(REPO))
      import jax
      from jaxreid.methods.nformer.model import nformer_apply
      run = lambda: np.asarray(jax.block_until_ready(nformer_apply(
          params, x, landmarks, num_queries=num_queries, k=args.k, heads=args.heads)))
    else:
      run = lambda: dense_nformer(params, x, landmarks, num_queries, args.k, args.heads)
    rss_before = peak_rss_mb()
    out, first, wall = timed(run, max(0, args.repeats - 1))
  except MemoryError as e:
    record.update(status="out_of_memory", error=str(e)[:120])
  else:
    record.update(status="ok", wall_s=round(wall, 2), first_call_s=round(first, 2),
                  peak_rss_mb=round(peak_rss_mb()), rss_before_run_mb=round(rss_before))
    np.save(args.out, out)
  print(json.dumps(record), flush=True)


def main(argv=None):
  args = parse_args(argv)
  if args.impl:
    return run_child(args)
  argv = list(argv if argv is not None else sys.argv[1:])
  child = lambda impl, size, tmp: run_impl(__file__, argv, impl, tmp, "--size", str(size))
  with tempfile.TemporaryDirectory() as tmp:
    full, _ = child("jaxreid", args.n, tmp)
    dense = dense_out = None
    for size in (int(s) for s in args.dense_sizes.split(",")):
      dense, dense_out = child("dense", size, tmp)
      if dense.get("status") == "ok":
        break
    summary = {"summary": "nformer_scale", "N": args.n,
               "jaxreid_ok_at_N": full.get("status") == "ok",
               "jaxreid_wall_s_at_N": full.get("wall_s"),
               "jaxreid_peak_rss_mb_at_N": full.get("peak_rss_mb")}
    if dense is not None and dense.get("status") == "ok":
      small, small_out = child("jaxreid", dense["N"], tmp)
      added = lambda r: r["peak_rss_mb"] - r["rss_before_run_mb"]
      summary.update(
          compared_N=dense["N"], dense_budget_gb=args.budget_gb,
          speedup_jaxreid_over_dense=round(dense["wall_s"] / small["wall_s"], 2),
          peak_rss_ratio_dense_over_jaxreid=round(dense["peak_rss_mb"] / small["peak_rss_mb"],
                                                  2),
          added_rss_ratio_dense_over_jaxreid=round(added(dense) / max(1, added(small)), 2),
          max_abs_diff=float(np.abs(small_out - dense_out).max()))
    else:
      summary["compared_N"] = None
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
