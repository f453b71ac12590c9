"""TransMatcher query × gallery scoring: tiled jitted scorer vs the official TransMatcher matcher
driven as the official evaluator drives it, vs a straightforward PyTorch-CPU implementation of the
same decoder, and the QAConv tiled scorer on maps of the same size for reference.

The official baseline needs a checkout of ShengcaiLiao/TransMatcher (nothing is downloaded):
`--official DIR` names its QAConv/projects/transmatcher folder; the module is imported from
there, given our weights through `matcher_to_official`, put in eval mode, and called as
`reid/evaluators.py` `pairwise_distance` does (make_kernel on the probes, then gallery chunks of
`--official-chunk`; `.cuda()` left out, float32, torch threads = cores). The default 4 is
pairwise_distance's own default; its `evaluate` passes gallery batches of 256 (all 128 here),
which measured the same on a 2-core CPU (637 vs 581–649 pairs/s).

Each implementation runs in its own child process (so peak RSS is its own); the parent checks
that the JAX and PyTorch TransMatcher scores agree. Prints one JSON line per implementation and
a summary line.

  python bench/bench_transmatcher_scoring.py            # 24×8 maps, d=512, D=2048, N=3, 32×128
  python bench/bench_transmatcher_scoring.py --quick    # tiny, seconds
  python bench/bench_transmatcher_scoring.py --official ~/src/TransMatcher/QAConv/projects/transmatcher
"""
import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

from harness import peak_rss_mb, run_impl, timed

REPO = pathlib.Path(__file__).resolve().parents[1]
IMPLS = {"jax": "transmatcher_jax_tiled_jit", "jax_bf16": "transmatcher_jax_tiled_jit_bf16",
         "torch": "transmatcher_torch_cpu",
         "qaconv": "qaconv_jax_tiled_jit", "official": "transmatcher_official_evaluator_cpu"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--height", type=int, default=24)
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--dim", type=int, default=512, help="d (neck channels)")
  parser.add_argument("--ffn", type=int, default=2048, help="D (decoder MLP width)")
  parser.add_argument("--layers", type=int, default=3, help="N (decoder layers)")
  parser.add_argument("--probes", type=int, default=32)
  parser.add_argument("--gallery", type=int, default=128)
  parser.add_argument("--tile-p", type=int, default=32)
  parser.add_argument("--tile-g", type=int, default=64)
  parser.add_argument("--torch-chunk", type=int, default=8, help="gallery maps per torch step")
  parser.add_argument("--official", help="folder of the official transmatcher.py "
                      "(QAConv/projects/transmatcher of a TransMatcher checkout)")
  parser.add_argument("--official-chunk", type=int, default=4,
                      help="gallery maps per official matcher call (the official evaluator: 4)")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes (4×2 maps, d=16, D=32, N=2, 16×32)")
  parser.add_argument("--impl", choices=sorted(IMPLS), help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.height, args.width, args.dim, args.ffn, args.layers = 4, 2, 16, 32, 2
    args.probes, args.gallery = 16, 32
  return args


def make_maps(args):
  """Stacked layer maps [P, N, h, w, d] and [G, N, h, w, d] (unit-variance random)."""
  rng = np.random.default_rng(args.seed)
  shape = (args.layers, args.height, args.width, args.dim)
  return (rng.standard_normal((args.probes, *shape), dtype=np.float32),
          rng.standard_normal((args.gallery, *shape), dtype=np.float32))


def transmatcher_variables(args, dtype="float32"):
  """(module, variables): xavier init, then BN affines and running stats set to non-defaults.
  `dtype`: of the S×S products (bfloat16 = what the paper settings' train.bf16 gives)."""
  import jax
  sys.path.insert(0, str(REPO))
  from jaxreid.methods.transmatcher.model import TransMatcher
  module = TransMatcher(args.height, args.width, num_layers=args.layers, ffn=args.ffn,
                        dtype=dtype)
  dummy = np.zeros((1, args.layers, args.height, args.width, args.dim), np.float32)
  variables = jax.device_get(module.init(jax.random.key(args.seed), dummy, dummy))
  rng = np.random.default_rng(args.seed + 1)

  def perturb(path, x):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32) * (100.0 if x.size == 1 else 1.0)
    if name == "mean" or (name in ("scale", "bias") and path[0].key == "params"):
      return (np.asarray(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return np.asarray(x)
  return module, jax.tree_util.tree_map_with_path(perturb, variables)


def torch_scores(probe, gallery, variables, args, device="cpu"):
  """The TransMatcher decoder (docs/methods/transmatcher.md) in plain PyTorch ops: fc1 once per map, gallery chunks."""
  import torch
  torch.set_grad_enabled(False)
  t = lambda x: torch.from_numpy(np.array(x, np.float32)).to(device)   # a writable copy
  params, stats = variables["params"], variables["batch_stats"]
  n, hw, d = args.layers, args.height * args.width, args.dim

  def bn(x, name, layer=None):
    p = params[name] if layer is None else params[layer][name]
    s = stats[name] if layer is None else stats[layer][name]
    return (x - t(s["mean"])) / torch.sqrt(t(s["var"]) + 1e-5) * t(p["scale"]) + t(p["bias"])

  def project(x):
    x = t(x).reshape(len(x), n, hw, d)
    return torch.einsum("bntd,nde->bnte", x, t(params["fc1_kernel"])) + t(
        params["fc1_bias"])[:, None]

  q, k = project(probe), project(gallery)
  prior = torch.sigmoid(t(params["prior"]))                      # [N, S_probe, S_gallery]
  out = torch.empty(len(probe), len(gallery), device=device)
  for g0 in range(0, len(gallery), args.torch_chunk):
    kc = k[g0:g0 + args.torch_chunk]
    total = 0.0
    for i in range(n):
      s = torch.einsum("ptd,grd->pgtr", q[:, i], kc[:, i]) * prior[i]
      x = torch.stack([s.amax(3), s.amax(2)], 2)                  # [P, g, 2, S]
      layer = f"layers_{i}"
      x = bn(x, "bn1", layer)
      x = x @ t(params[layer]["fc2"]["kernel"]) + t(params[layer]["fc2"]["bias"])
      x = torch.relu(bn(x, "bn2", layer))
      x = (x @ t(params[layer]["fc3"]["kernel"]) + t(params[layer]["fc3"]["bias"]))[..., 0]
      total = total + bn(x.sum(-1), "bn3", layer)
    out[:, g0:g0 + args.torch_chunk] = bn(total, "norm")
  return out.float().cpu().numpy()


def official_matcher(folder, variables, args):
  """The official TransMatcher module (`folder`/transmatcher.py) holding our `variables`, in
  eval mode."""
  import importlib.util
  import torch
  sys.path.insert(0, str(REPO))
  from jaxreid.methods.transmatcher.convert import matcher_to_official
  spec = importlib.util.spec_from_file_location(
      "official_transmatcher", pathlib.Path(folder).expanduser() / "transmatcher.py")
  official = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(official)
  matcher = official.TransMatcher(args.height * args.width, args.dim, args.layers, args.ffn)
  state = matcher_to_official(variables["params"], variables["batch_stats"])
  state = {k[len("matcher."):]: torch.from_numpy(np.array(v))
           for k, v in state.items()}
  missing, unexpected = matcher.load_state_dict(state, strict=False)
  assert not unexpected and all(k.startswith("decoder_layer.") or k.endswith(
      "num_batches_tracked") for k in missing), (missing, unexpected)
  return matcher.eval()


def official_maps(x, args):
  """[B, N, h, w, d] → the official layout, the N layers concatenated on channels [B, h, w, N·d]."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(
      np.moveaxis(x, 1, 3).reshape(len(x), args.height, args.width, -1)))


def official_scores(probe, gallery, variables, args):
  """The official module with our weights, called as the official evaluator's
  `pairwise_distance` does (make_kernel on the probes, then gallery chunks)."""
  import torch
  torch.set_grad_enabled(False)
  matcher = official_matcher(args.official, variables, args)
  prob, gal = official_maps(probe, args), official_maps(gallery, args)
  score = torch.zeros(len(probe), len(gallery))
  matcher.make_kernel(prob)
  for k in range(0, len(gallery), args.official_chunk):
    score[:, k:k + args.official_chunk] = matcher(gal[k:k + args.official_chunk])
  return score.numpy()


def run_child(args):
  probe, gallery = make_maps(args)
  extra = {}
  if args.impl == "official":
    import torch
    _, variables = transmatcher_variables(args)
    run = lambda: official_scores(probe, gallery, variables, args)
    extra = {"torch_threads": torch.get_num_threads(), "chunk": args.official_chunk}
  elif args.impl == "torch":
    import torch
    _, variables = transmatcher_variables(args)
    run = lambda: torch_scores(probe, gallery, variables, args)
    extra = {"torch_threads": torch.get_num_threads(), "chunk": args.torch_chunk}
  else:
    import jax
    sys.path.insert(0, str(REPO))
    from jaxreid.eval.scoring import score_matrix
    if args.impl in ("jax", "jax_bf16"):
      module, variables = transmatcher_variables(
          args, "bfloat16" if args.impl == "jax_bf16" else "float32")
    else:  # QAConv on the last layer's maps, L2-normalised as QAConv expects
      from jaxreid.methods.qaconv.model import QAConv
      module = QAConv(args.height, args.width)
      probe, gallery = (x[:, -1] / np.linalg.norm(x[:, -1], axis=-1, keepdims=True)
                        for x in (probe, gallery))
      variables = module.init(jax.random.key(0), probe[:1], gallery[:1])
    match = lambda v, p, g: module.apply(v, p, g)   # one object: one jit cache entry
    run = lambda: score_matrix(match, variables, probe, gallery, tile_p=args.tile_p,
                               tile_g=args.tile_g)
    extra = {"tile_p": args.tile_p, "tile_g": args.tile_g, "devices": jax.device_count(),
             "backend": jax.default_backend()}
  scores, first, wall = timed(run, args.repeats)
  np.save(args.out, scores)
  pairs = args.probes * args.gallery
  print(json.dumps({
      "impl": IMPLS[args.impl], "pairs": pairs,
      "maps": [args.layers, args.height, args.width, args.dim], "D": args.ffn,
      "P": args.probes, "G": args.gallery, "wall_s": round(wall, 4),
      "first_call_s": round(first, 4), "pairs_per_s": round(pairs / wall, 1),
      "peak_rss_mb": round(peak_rss_mb(), 1),
      **extra}), flush=True)


def main(argv=None):
  args = parse_args(argv)
  if args.impl:
    return run_child(args)
  argv = list(argv if argv is not None else sys.argv[1:])
  results, outputs = {}, {}
  impls = ("jax", "jax_bf16", "torch", "qaconv") + (("official",) if args.official else ())
  with tempfile.TemporaryDirectory() as tmp:
    for impl in impls:
      results[impl], outputs[impl] = run_impl(__file__, argv, impl, tmp)
  diff = np.abs(outputs["jax"] - outputs["torch"])
  rate = lambda impl: results[impl]["pairs_per_s"]
  official = {}
  if args.official and outputs["official"] is not None:
    off = np.abs(outputs["jax"] - outputs["official"])
    official = {"speedup_jax_over_official": round(rate("jax") / rate("official"), 2),
                "speedup_jax_bf16_over_official": round(rate("jax_bf16") / rate("official"), 2),
                "max_abs_diff_bf16_official": float(np.abs(outputs["jax_bf16"]
                                                           - outputs["official"]).max()),
                "max_abs_diff_official": float(off.max())}
  print(json.dumps({
      "summary": "transmatcher_scoring", **official,
      "speedup_jax_over_torch": round(rate("jax") / rate("torch"), 2),
      "transmatcher_over_qaconv_time": round(rate("qaconv") / rate("jax"), 2),
      "max_abs_diff": float(diff.max()),
      "max_rel_diff": float((diff / np.maximum(np.abs(outputs["torch"]), 1.0)).max())}))


if __name__ == "__main__":
  main()
