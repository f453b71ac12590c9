"""k-reciprocal re-ranking at MSMT17 size (11,659 queries × 82,161 gallery) with GG never in
memory: jaxreid.rerank given GG as a function of column blocks (cosine distances of random
features, computed block by block in the neighbour pass and kept in an on-disk .npy file).

Prints one JSON line: wall time, peak RSS (resource.getrusage), the GG file's size on disk and
the inputs' size. `--check` also runs the in-memory path (GG as one array) on the same inputs
and reports the largest difference; use it only at sizes where G² floats fit in memory.

  python bench/bench_rerank_memmap.py                   # MSMT17 size (~27 GB of disk for GG)
  python bench/bench_rerank_memmap.py --quick --check   # P = 500, G = 3,000, both paths
"""
import argparse
import json
import os
import pathlib
import sys
import threading
import time

import numpy as np

from harness import peak_rss_mb

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queries", type=int, default=11659)
  parser.add_argument("--gallery", type=int, default=82161)
  parser.add_argument("--ids", type=int, default=3060, help="MSMT17's test identities")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--noise", type=float, default=1.0, help="feature noise around each id")
  parser.add_argument("--k1", type=int, default=20)
  parser.add_argument("--k2", type=int, default=6)
  parser.add_argument("--lambda-value", type=float, default=0.3)
  parser.add_argument("--block-dir", default=None, help="where the GG file goes (default: the "
                      "system's temporary directory)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--check", action="store_true", help="also run the in-memory path")
  parser.add_argument("--quick", action="store_true", help="P = 500, G = 3,000, 200 ids")
  args = parser.parse_args(argv)
  if args.quick:
    args.queries, args.gallery, args.ids = 500, 3000, 200
  return args


def features(args):
  """Unit vectors: a random centre per id plus noise (query then gallery)."""
  rng = np.random.default_rng(args.seed)
  centres = rng.standard_normal((args.ids, args.dim), dtype=np.float32)
  x = centres[rng.integers(0, args.ids, args.queries + args.gallery)]
  x += args.noise * rng.standard_normal(x.shape, dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x[:args.queries], x[args.queries:]


def distances(a, b):
  """1 - sigmoid(30·cos / 10) = 1 / (1 + exp(3·cos)) [len(a), len(b)], in row chunks."""
  out = np.empty((len(a), len(b)), np.float32)
  for i in range(0, len(a), 1024):
    np.exp(3 * (a[i:i + 1024] @ b.T), out=out[i:i + 1024])
  out += 1
  np.reciprocal(out, out=out)
  return out


def main(argv=None):
  args = parse_args(argv)
  sys.path.insert(0, str(REPO))
  from jaxreid.eval.rerank import rerank
  q, g = features(args)
  qg, qq = distances(q, g), distances(q, q)
  input_mb = (qg.nbytes + qq.nbytes) / 2**20
  disk = [0]

  def gg_columns(start, stop):        # GG[:, start:stop]ᵀ; cosine is symmetric
    return distances(g[start:stop], g)

  def watch(stop_event):
    """The largest size on disk of rerank's temporary GG file(s)."""
    root = pathlib.Path(args.block_dir or os.environ.get("TMPDIR", "/tmp"))
    while not stop_event.wait(1.0):
      for path in root.glob("rerank_gg_*/gg_columns.npy"):
        try:
          disk[0] = max(disk[0], path.stat().st_blocks * 512)
        except FileNotFoundError:
          pass

  rss_before = peak_rss_mb()
  done = threading.Event()
  watcher = threading.Thread(target=watch, args=(done,), daemon=True)
  watcher.start()
  t0 = time.perf_counter()
  out = rerank(qg, qq, gg_columns, args.k1, args.k2, args.lambda_value,
               block_dir=args.block_dir)
  wall = time.perf_counter() - t0
  done.set()
  watcher.join()
  record = {"impl": "jaxreid_rerank_gg_blocks_on_disk", "P": args.queries, "G": args.gallery,
            "dim": args.dim, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_rss_mb()),
            "rss_before_run_mb": round(rss_before), "input_mb": round(input_mb),
            "gg_disk_mb": round(disk[0] / 2**20),
            "gg_in_memory_would_be_mb": round(4 * args.gallery**2 / 2**20)}
  if args.check:
    t0 = time.perf_counter()
    want = rerank(qg, qq, distances(g, g), args.k1, args.k2, args.lambda_value)
    record.update(in_memory_wall_s=round(time.perf_counter() - t0, 1),
                  max_abs_diff=float(np.abs(out - want).max()),
                  identical=bool(np.array_equal(out, want)))
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
