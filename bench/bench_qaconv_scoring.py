"""QAConv query × gallery scoring: tiled jitted scorer vs chunked NumPy, and vs the official
QAConv v2.1 matcher driven as its evaluator drives it, on the same inputs.

The official baseline needs a checkout of ShengcaiLiao/QAConv at v2.1 (nothing is downloaded):
`--official DIR` names its reid/models folder; `qaconv.py` is imported from there, given the same
weights, put in eval mode and called as `reid/evaluators.py` `pairwise_distance` does
(make_kernel on the probes, gallery chunks of `--official-chunk` = 4 as there; `.cuda()` left
out, float32, torch threads = cores).

Each implementation runs in its own child process (so peak RSS is its own); the parent checks
that both gave the same scores. Prints one JSON line per implementation and a summary line.

  python bench/bench_qaconv_scoring.py            # 24×8 maps, d=128, P=128, G=512
  python bench/bench_qaconv_scoring.py --quick    # tiny, seconds
  python bench/bench_qaconv_scoring.py --official ~/src/QAConv/reid/models
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
  parser.add_argument("--height", type=int, default=24)
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--probes", type=int, default=128)
  parser.add_argument("--gallery", type=int, default=512)
  parser.add_argument("--tile-p", type=int, default=64)
  parser.add_argument("--tile-g", type=int, default=256)
  parser.add_argument("--numpy-chunk", type=int, default=0,
                      help="probes per NumPy chunk (0: keep the chunk's similarities <= 256 MB)")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="tiny sizes (4×2 maps, d=16, 16×32)")
  parser.add_argument("--official", help="folder of the official qaconv.py (reid/models of a "
                      "QAConv v2.1 checkout)")
  parser.add_argument("--official-chunk", type=int, default=4,
                      help="gallery maps per official matcher call (the official evaluator: 4)")
  parser.add_argument("--impl", choices=["jax", "numpy", "official"], help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.height, args.width, args.dim, args.probes, args.gallery = 4, 2, 16, 16, 32
  return args


def make_inputs(args):
  """L2-normalised probe/gallery maps and QAConv v2.1 weights with non-default values."""
  rng = np.random.default_rng(args.seed)

  def maps(n):
    x = rng.standard_normal((n, args.height, args.width, args.dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  hw = args.height * args.width
  weights = {
      "bn": dict(mean=0.3, var=0.02, scale=1.5, bias=0.1),
      "logit_bn": dict(mean=2.0, var=4.0, scale=1.2, bias=-0.5),
      "fc_kernel": (1.0 + 0.1 * rng.standard_normal(hw)).astype(np.float32) / hw,
      "fc_bias": 0.05,
  }
  return maps(args.probes), maps(args.gallery), weights


def numpy_scores(probe, gallery, weights, chunk):
  """QAConv v2.1 in NumPy: matmul → max both ways → BN → fc → sum → BN, probe chunks."""
  p_num, g_num = len(probe), len(gallery)
  hw, d = probe.shape[1] * probe.shape[2], probe.shape[3]
  g = gallery.reshape(g_num * hw, d)
  bn, lbn = weights["bn"], weights["logit_bn"]
  bn_a = bn["scale"] / np.sqrt(bn["var"] + 1e-5)
  out = np.empty((p_num, g_num), np.float32)
  for start in range(0, p_num, chunk):
    p = probe[start:start + chunk]
    sim = (p.reshape(-1, d) @ g.T).reshape(len(p), hw, g_num, hw)    # [p, t, G, r]
    pooled = np.stack([sim.max(axis=3).transpose(0, 2, 1), sim.max(axis=1)], axis=2)
    pooled = (pooled - bn["mean"]) * bn_a + bn["bias"]                # [p, G, 2, hw]
    logits = (pooled @ weights["fc_kernel"] + weights["fc_bias"]).sum(-1)
    out[start:start + chunk] = ((logits - lbn["mean"]) / np.sqrt(lbn["var"] + 1e-5)
                                * lbn["scale"] + lbn["bias"])
  return out


def jax_scorer(args, weights):
  """(match_fn, variables) for score_matrix, variables laid out as QAConv.init makes them."""
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, str(REPO))
  from jaxreid.methods.qaconv.model import QAConv

  module = QAConv(args.height, args.width)
  f32 = lambda v: jnp.full((1,), v, jnp.float32)
  variables = {
      "params": {"bn": {"scale": f32(weights["bn"]["scale"]), "bias": f32(weights["bn"]["bias"])},
                 "fc": {"kernel": jnp.asarray(weights["fc_kernel"])[:, None],
                        "bias": f32(weights["fc_bias"])},
                 "logit_bn": {"scale": f32(weights["logit_bn"]["scale"]),
                              "bias": f32(weights["logit_bn"]["bias"])}},
      "batch_stats": {k: {"mean": f32(weights[k]["mean"]), "var": f32(weights[k]["var"])}
                      for k in ("bn", "logit_bn")},
  }
  dummy = jnp.zeros((1, args.height, args.width, args.dim))
  init = jax.eval_shape(module.init, jax.random.key(0), dummy, dummy)
  if jax.tree.map(lambda x: x.shape, init) != jax.tree.map(lambda x: x.shape, variables):
    raise RuntimeError("QAConv's variables changed layout; update bench_qaconv_scoring.py.")
  return (lambda v, p, g: module.apply(v, p, g)), variables


def official_matcher(folder, weights, args):
  """The official QAConv module (`folder`/qaconv.py) holding `weights`, in eval mode."""
  import importlib.util
  import torch
  spec = importlib.util.spec_from_file_location(
      "official_qaconv", pathlib.Path(folder).expanduser() / "qaconv.py")
  official = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(official)
  matcher = official.QAConv(args.dim, args.height, args.width)
  one = lambda v: torch.full((1,), float(v))
  state = {f"{name}.{leaf}": one(weights[name][key]) for name in ("bn", "logit_bn")
           for leaf, key in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                             ("running_var", "var"))}
  state["fc.weight"] = torch.from_numpy(weights["fc_kernel"])[None]
  state["fc.bias"] = one(weights["fc_bias"])
  missing, unexpected = matcher.load_state_dict(state, strict=False)
  assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
  return matcher.eval()


def official_scores(probe, gallery, weights, args):
  """The official QAConv module with `weights`, called as the official evaluator calls it."""
  import torch
  torch.set_grad_enabled(False)
  matcher = official_matcher(args.official, weights, args)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  prob, gal = nchw(probe), nchw(gallery)
  score = torch.zeros(len(probe), len(gallery))
  matcher.make_kernel(prob)
  for k in range(0, len(gallery), args.official_chunk):
    score[:, k:k + args.official_chunk] = matcher(gal[k:k + args.official_chunk])
  return score.numpy()


def run_child(args):
  probe, gallery, weights = make_inputs(args)
  if args.impl == "official":
    import torch
    run = lambda: official_scores(probe, gallery, weights, args)
    extra = {"torch_threads": torch.get_num_threads(), "chunk": args.official_chunk}
  elif args.impl == "numpy":
    hw = args.height * args.width
    chunk = args.numpy_chunk or max(1, (256 << 20) // (4 * args.gallery * hw * hw))
    run = lambda: numpy_scores(probe, gallery, weights, chunk)
    extra = {"chunk": chunk}
  else:
    import jax
    sys.path.insert(0, str(REPO))
    from jaxreid.eval import score_matrix
    match, variables = jax_scorer(args, weights)
    run = lambda: score_matrix(match, variables, probe, gallery, tile_p=args.tile_p,
                               tile_g=args.tile_g)
    extra = {"tile_p": args.tile_p, "tile_g": args.tile_g, "devices": jax.device_count(),
             "backend": jax.default_backend()}
  rss_before = peak_rss_mb()
  scores, first, wall = timed(run, args.repeats)
  np.save(args.out, scores)
  pairs = args.probes * args.gallery
  print(json.dumps({
      "impl": {"jax": "jax_tiled_jit", "numpy": "numpy_chunked",
               "official": "official_evaluator_cpu"}[args.impl],
      "pairs": pairs, "maps": [args.height, args.width, args.dim],
      "P": args.probes, "G": args.gallery, "wall_s": round(wall, 4),
      "first_call_s": round(first, 4), "pairs_per_s": round(pairs / wall, 1),
      "peak_rss_mb": round(peak_rss_mb(), 1),
      "rss_before_run_mb": round(rss_before, 1), **extra}), flush=True)


def main(argv=None):
  args = parse_args(argv)
  if args.impl:
    return run_child(args)
  argv = list(argv if argv is not None else sys.argv[1:])
  results, outputs = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for impl in ("jax", "numpy") + (("official",) if args.official else ()):
      results[impl], outputs[impl] = run_impl(__file__, argv, impl, tmp)
  diff = np.abs(outputs["jax"] - outputs["numpy"])
  official = {}
  if args.official and outputs["official"] is not None:
    official = {"speedup_jax_over_official": round(
                    results["jax"]["pairs_per_s"] / results["official"]["pairs_per_s"], 2),
                "max_abs_diff_official": float(np.abs(outputs["jax"] - outputs["official"]).max())}
  print(json.dumps({
      "summary": "qaconv_scoring", **official, "speedup_jax_over_numpy":
          round(results["jax"]["pairs_per_s"] / results["numpy"]["pairs_per_s"], 2),
      "max_abs_diff": float(diff.max()),
      "max_rel_diff": float((diff / np.maximum(np.abs(outputs["numpy"]), 1.0)).max())}))


if __name__ == "__main__":
  main()
