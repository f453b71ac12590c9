"""KPM query × gallery scoring at paper size (three hourglass scales 8×4×2048, 16×8×1024,
32×16×512 of a 256×128 input; RSA width 256): the tiled jitted scorer vs the same computation
in plain PyTorch-CPU ops (gallery chunks), with the peak memory of one tile.

Each implementation runs in its own child process (so peak RSS is its own); the parent checks
that the scores agree. Prints one JSON line per implementation and a summary line. For the JAX
scorer, `tile_temp_mb` is XLA's temporary buffer size of the compiled tile (the M×M affinities
of tile_p × tile_g pairs live only there).

  python bench/bench_kpm_scoring.py            # paper size, 16 × 32 pairs, tiles 16 × 32
  python bench/bench_kpm_scoring.py --quick    # tiny, seconds
"""
import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

from harness import peak_rss_mb, run_impl, timed

REPO = pathlib.Path(__file__).resolve().parents[1]
IMPLS = {"jax": "kpm_jax_tiled_jit", "torch": "kpm_torch_cpu"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--height", type=int, default=8, help="scale-1 map height")
  parser.add_argument("--width", type=int, default=4, help="scale-1 map width")
  parser.add_argument("--channels", type=int, default=2048, help="scale-1 channels")
  parser.add_argument("--scales", type=int, default=3)
  parser.add_argument("--rsa", type=int, default=256, help="RSA conv width")
  parser.add_argument("--probes", type=int, default=16)
  parser.add_argument("--gallery", type=int, default=32)
  parser.add_argument("--tile-p", type=int, default=16)
  parser.add_argument("--tile-g", type=int, default=32)
  parser.add_argument("--torch-chunk", type=int, default=8, help="gallery maps per torch step")
  parser.add_argument("--repeats", type=int, default=1, help="timed runs after a warm-up")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="tiny sizes (2×1×64, 8 × 16 pairs)")
  parser.add_argument("--impl", choices=sorted(IMPLS), help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.height, args.width, args.channels, args.rsa = 2, 1, 64, 16
    args.probes, args.gallery, args.tile_p, args.tile_g = 8, 16, 4, 8
  return args


def shapes(args):
  return tuple((args.height * 2**s, args.width * 2**s, args.channels // 2**s)
               for s in range(args.scales))


def make_features(args):
  """Non-negative random features in the encoder's packed [N, T, C_S] layout."""
  rng = np.random.default_rng(args.seed)

  def packed(n):
    flat = np.concatenate([rng.gamma(1.0, 1.0, (n, h * w * c)).astype(np.float32)
                           for h, w, c in shapes(args)], 1)
    return flat.reshape(n, -1, shapes(args)[-1][2])
  return packed(args.probes), packed(args.gallery)


def kpm_variables(args):
  """(module, variables): Flax init, then BN affines and running statistics moved off their
  defaults."""
  import jax
  sys.path.insert(0, str(REPO))
  from jaxreid.methods.kpm.model import KPMMatcher
  module = KPMMatcher(shapes(args), rsa_channels=args.rsa)
  p, g = make_features(argparse.Namespace(**{**vars(args), "probes": 1, "gallery": 1}))
  variables = jax.device_get(jax.jit(module.init)(jax.random.key(args.seed), p, g))
  rng = np.random.default_rng(args.seed + 1)

  def perturb(path, x):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    if name == "mean" or (name in ("scale", "bias") and path[0].key == "params"):
      return (np.asarray(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return np.asarray(x)
  return module, jax.tree_util.tree_map_with_path(perturb, variables)


def torch_scores(probe, gallery, variables, args, tau=0.05, tau_rsa=1.0):
  """KPM (docs/methods/kpm.md) in plain PyTorch ops: RSA once per probe, gallery chunks."""
  import torch
  torch.set_grad_enabled(False)
  t = lambda x: torch.from_numpy(np.asarray(x, np.float32))
  params, stats = variables["params"], variables["batch_stats"]

  def bn(x, p, s):
    return (x - t(s["mean"])) / torch.sqrt(t(s["var"]) + 1e-5) * t(p["scale"]) + t(p["bias"])

  def split(x):
    x, out, start = t(x).reshape(len(x), -1), [], 0
    for h, w, c in shapes(args):
      out.append(x[:, start:start + h * w * c].reshape(len(x), h * w, c))
      start += h * w * c
    return out

  xs, ys = split(probe), split(gallery)
  units = lambda a: a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
  alphas, sums = [], []
  for s, x in enumerate(xs):                       # RSA and Σ α x: once per probe
    rsa, rsa_s = params[f"rsa_{s}"], stats[f"rsa_{s}"]
    h = torch.relu(bn(x @ t(rsa["conv1"]["kernel"]), rsa["bn1"], rsa_s["bn1"]))
    h = torch.relu(bn(h @ t(rsa["conv2"]["kernel"]), rsa["bn2"], rsa_s["bn2"]))
    a = (h @ t(rsa["conv3"]["kernel"]))[..., 0] + t(rsa["conv3"]["bias"])
    alphas.append(1 + torch.softmax(a / tau_rsa, -1))
    sums.append(torch.einsum("pm,pmc->pc", alphas[-1], x))
  out = torch.empty(len(probe), len(gallery))
  for g0 in range(0, len(gallery), args.torch_chunk):
    feats = []
    for s, (x, y) in enumerate(zip(xs, ys)):
      yc = y[g0:g0 + args.torch_chunk]
      beta = torch.softmax(torch.einsum("pmc,gnc->pgmn", units(x), units(yc)) / tau, -1)
      w = torch.einsum("pm,pgmn->pgn", alphas[s], beta)
      delta = sums[s][:, None] - torch.einsum("pgn,gnc->pgc", w, yc)
      feats.append(bn(delta * delta, params[f"bn_{s}"], stats[f"bn_{s}"]))
    head = params["classifier"]
    out[:, g0:g0 + args.torch_chunk] = (torch.cat(feats, -1) @ t(head["kernel"]))[..., 0] + t(
        head["bias"])[0]
  return out.numpy()


def tile_temp_mb(module, variables, args, probe, gallery):
  """XLA's temporary buffer size of one compiled tile (None where the backend does not say)."""
  import jax
  tp, tg = min(args.tile_p, args.probes), min(args.tile_g, args.gallery)
  compiled = jax.jit(lambda v, p, g: module.apply(v, p, g)).lower(
      variables, probe[:tp], gallery[:tg]).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return round(analysis.temp_size_in_bytes / 2**20, 1)


def run_child(args):
  probe, gallery = make_features(args)
  module, variables = kpm_variables(args)
  extra = {}
  if args.impl == "torch":
    import torch
    run = lambda: torch_scores(probe, gallery, variables, args)
    extra = {"torch_threads": torch.get_num_threads(), "chunk": args.torch_chunk}
  else:
    import jax
    from jaxreid.eval.scoring import score_matrix
    match = lambda v, p, g: module.apply(v, p, g)   # one object: one jit cache entry
    run = lambda: score_matrix(match, variables, probe, gallery, tile_p=args.tile_p,
                               tile_g=args.tile_g)
    extra = {"tile_p": args.tile_p, "tile_g": args.tile_g, "devices": jax.device_count(),
             "backend": jax.default_backend(),
             "tile_temp_mb": tile_temp_mb(module, variables, args, probe, gallery)}
  scores, first, wall = timed(run, args.repeats)
  np.save(args.out, scores)
  pairs = args.probes * args.gallery
  print(json.dumps({
      "impl": IMPLS[args.impl], "pairs": pairs, "scales": [list(s) for s in shapes(args)],
      "rsa": args.rsa, "P": args.probes, "G": args.gallery, "wall_s": round(wall, 4),
      "first_call_s": round(first, 4), "pairs_per_s": round(pairs / wall, 1),
      "peak_rss_mb": round(peak_rss_mb(), 1), **extra}), flush=True)


def main(argv=None):
  args = parse_args(argv)
  if args.impl:
    return run_child(args)
  argv = list(argv if argv is not None else sys.argv[1:])
  results, outputs = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for impl in ("jax", "torch"):
      results[impl], outputs[impl] = run_impl(__file__, argv, impl, tmp)
  diff = np.abs(outputs["jax"] - outputs["torch"])
  rate = lambda impl: results[impl]["pairs_per_s"]
  print(json.dumps({
      "summary": "kpm_scoring", "speedup_jax_over_torch": round(rate("jax") / rate("torch"), 2),
      "max_abs_diff": float(diff.max()),
      "max_rel_diff": float((diff / np.maximum(np.abs(outputs["torch"]), 1.0)).max())}))


if __name__ == "__main__":
  main()
