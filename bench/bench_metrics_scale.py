"""Ranking metrics at MSMT17 scale: jaxreid's blocked, sort-free evaluate_ranking vs the
straightforward NumPy evaluator (one argsort of the whole matrix, then a loop over queries, as
torchreid / open-reid do), on the same random score matrix.

Each run is a child process (peak RSS is its own); the straightforward one runs under an
address-space limit of --budget-gb. It is tried at full size (it needs ~21 bytes per score, so
11,659 × 82,161 does not fit in 8 GB), then at the largest query count that fits, where both
implementations are compared: time, peak RSS and results. Prints one JSON line per run and a
summary line.

  python bench/bench_metrics_scale.py            # 11,659 × 82,161 (3.8 GB of float32 scores)
  python bench/bench_metrics_scale.py --quick    # 2,000 × 20,000
"""
import argparse
import importlib.util
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np

from harness import peak_rss_mb, run_impl

REPO = pathlib.Path(__file__).resolve().parents[1]
BYTES_PER_SCORE_ARGSORT = 4 + 8 + 8 + 1   # scores, int64 order, gathered ids, match mask


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queries", type=int, default=11659)
  parser.add_argument("--gallery", type=int, default=82161)
  parser.add_argument("--ids", type=int, default=3060)
  parser.add_argument("--cams", type=int, default=15)
  parser.add_argument("--budget-gb", type=float, default=8.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="2,000 × 20,000, 500 ids")
  parser.add_argument("--impl", choices=["jaxreid", "argsort"], help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.queries, args.gallery, args.ids = 2000, 20000, 500
  return args


def make_problem(num_q, num_g, num_ids, num_cams, seed):
  """Random float32 scores (N(0, 1)), ids and cameras, drawn in row chunks (no big temporary)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, num_ids, num_g)
  cams = rng.integers(0, num_cams, num_g)
  q_ids, q_cams = rng.integers(0, num_ids, num_q), rng.integers(0, num_cams, num_q)
  scores = np.empty((num_q, num_g), np.float32)
  for i in range(0, num_q, 64):
    rows = np.random.default_rng([seed, i]).standard_normal((min(64, num_q - i), num_g),
                                                            dtype=np.float32)
    scores[i:i + len(rows)] = rows
  return scores, q_ids, ids, q_cams, cams


def argsort_metrics(dist, q_ids, g_ids, q_cams, g_cams, max_rank=50):
  """The usual evaluator: argsort every row at once, then per query filter, CMC, AP, INP."""
  order = np.argsort(dist, axis=1)
  matches = (g_ids[order] == q_ids[:, None]).astype(np.int32)
  cmcs, aps, inps = [], [], []
  for i in range(len(dist)):
    keep = ~((g_ids[order[i]] == q_ids[i]) & (g_cams[order[i]] == q_cams[i]))
    hits = matches[i][keep]
    if not hits.any():
      continue
    found = hits.cumsum()
    cmcs.append(np.minimum(found[:max_rank], 1))
    aps.append((found / np.arange(1, len(hits) + 1))[hits > 0].mean())
    last = np.flatnonzero(hits)[-1]
    inps.append(found[last] / (last + 1.0))
  return {"cmc": np.mean(cmcs, axis=0), "mAP": float(np.mean(aps)),
          "mINP": float(np.mean(inps)), "num_valid_queries": len(aps)}


def load_metrics_module():
  """jaxreid/eval/metrics.py on its own (NumPy only), so neither child imports JAX."""
  spec = importlib.util.spec_from_file_location("metrics", REPO / "jaxreid/eval/metrics.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_child(args):
  if args.impl == "argsort":
    limit = int(args.budget_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  record = {"impl": {"jaxreid": "jaxreid_blocked", "argsort": "numpy_argsort"}[args.impl],
            "P": args.queries, "G": args.gallery}
  try:
    scores, q_ids, g_ids, q_cams, g_cams = make_problem(args.queries, args.gallery, args.ids,
                                                        args.cams, args.seed)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    if args.impl == "jaxreid":
      metrics = load_metrics_module().evaluate_ranking(scores, q_ids, g_ids, q_cams, g_cams)
    else:
      np.negative(scores, out=scores)   # distances, in place
      metrics = argsort_metrics(scores, q_ids, g_ids, q_cams, g_cams)
    wall = time.perf_counter() - t0
  except MemoryError as e:
    record.update(status="out_of_memory", budget_gb=args.budget_gb, error=str(e)[:120])
  else:
    record.update(status="ok", wall_s=round(wall, 2),
                  peak_rss_mb=round(peak_rss_mb()),
                  rss_before_run_mb=round(rss_before), mAP=metrics["mAP"],
                  mINP=metrics["mINP"], R1=float(metrics["cmc"][0]),
                  num_valid_queries=metrics["num_valid_queries"])
    np.save(args.out, metrics["cmc"])
  print(json.dumps(record), flush=True)


def child(argv, impl, queries, tmp):
  return run_impl(__file__, argv, impl, tmp, "--queries", str(queries))


def main(argv=None):
  args = parse_args(argv)
  if args.impl:
    return run_child(args)
  argv = list(argv if argv is not None else sys.argv[1:])
  fit = int((args.budget_gb - 1.5) * 2**30 / (BYTES_PER_SCORE_ARGSORT * args.gallery))
  fit = max(1, min(fit, args.queries))
  with tempfile.TemporaryDirectory() as tmp:
    full, _ = child(argv, "jaxreid", args.queries, tmp)
    base_full, _ = child(argv, "argsort", args.queries, tmp)
    if base_full["status"] == "ok":
      fit = args.queries
    base, base_cmc = (base_full, None) if fit == args.queries else child(argv, "argsort", fit, tmp)
    while base["status"] != "ok" and fit > 1:
      fit = int(fit * 0.8)
      base, base_cmc = child(argv, "argsort", fit, tmp)
    ours, ours_cmc = child(argv, "jaxreid", fit, tmp) if fit != args.queries else (full, None)
    if base_cmc is None:
      base_cmc = np.load(os.path.join(tmp, f"argsort_--queries_{fit}.npy"))
    if ours_cmc is None:
      ours_cmc = np.load(os.path.join(tmp, f"jaxreid_--queries_{fit}.npy"))
  print(json.dumps({
      "summary": "metrics_scale", "full_size": [args.queries, args.gallery],
      "argsort_fits_budget_at_full_size": base_full["status"] == "ok",
      "compared_at_P": fit, "budget_gb": args.budget_gb,
      "speedup_jaxreid_over_argsort": round(base["wall_s"] / ours["wall_s"], 2),
      "peak_rss_ratio_argsort_over_jaxreid": round(base["peak_rss_mb"] / ours["peak_rss_mb"], 2),
      "added_rss_ratio_argsort_over_jaxreid": round(
          (base["peak_rss_mb"] - base["rss_before_run_mb"])
          / max(1, ours["peak_rss_mb"] - ours["rss_before_run_mb"]), 2),
      "max_abs_diff": max(abs(base["mAP"] - ours["mAP"]), abs(base["mINP"] - ours["mINP"]),
                          float(np.abs(base_cmc - ours_cmc).max())),
      "jaxreid_full_size_wall_s": full.get("wall_s"),
      "jaxreid_full_size_peak_rss_mb": full.get("peak_rss_mb")}))


if __name__ == "__main__":
  main()
