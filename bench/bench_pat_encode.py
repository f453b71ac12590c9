"""PAT encode throughput at the paper size (ViT-B/16, 256×128, stride 16, part-aware mask):
jaxreid (`jaxreid.load("pat", official .pth)` → `encode`) vs the same model in PyTorch-CPU (a
transcription of the official part-attention ViT in the tests, eval masks as the official
`attn_mask_generate` with full bands), on the same random weights and images.

Each implementation runs in its own child process (peak RSS is its own); the parent checks that
both gave the same features. Prints one JSON line per implementation and a summary line.

  python bench/bench_pat_encode.py            # ViT-B/16, 64 images in batches of 32
  python bench/bench_pat_encode.py --quick    # DeiT-T width, depth 2, 8 images
"""
import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

from harness import peak_rss_mb, run_impl, timed

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--depth", type=int, default=12)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--stride", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--impl", choices=["jaxreid", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  parser.add_argument("--weights", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.images, args.batch, args.dim, args.depth, args.heads = 8, 8, 192, 2, 3
  return args


H, W, PATCH = 256, 128, 16


def grid(args):
  return (H - PATCH) // args.stride + 1, (W - PATCH) // args.stride + 1


def torch_model(args):
  from torch_vit import ViT
  return ViT(args.dim, args.depth, args.heads, patch=PATCH, stride=args.stride, grid=grid(args),
             parts=3, attn_name="part_attn").eval()


def images(args):
  return np.random.default_rng(0).integers(0, 256, (args.images, H, W, 3), dtype=np.uint8)


def child(args):
  x = images(args)
  if args.impl == "jaxreid":
    import jaxreid
    model = jaxreid.load("pat", args.weights, input_size=(H, W), batch_size=args.batch)
    run = lambda: model.encode(x)
  else:
    import torch
    from torch_vit import official_eval_mask
    if args.threads:
      torch.set_num_threads(args.threads)
    model = torch_model(args)
    state = torch.load(args.weights, weights_only=True)
    model.load_state_dict({k[len("base."):]: v for k, v in state.items()
                           if k.startswith("base.") and not k.startswith("base.fc.")})
    mask = official_eval_mask(*grid(args))

    def run():
      out = []
      with torch.no_grad():
        for i in range(0, len(x), args.batch):
          t = torch.from_numpy(x[i:i + args.batch]).float().div(255).sub(0.5).div(0.5)
          cls = model(t.permute(0, 3, 1, 2), mask)[:, 0]
          out.append(torch.nn.functional.normalize(cls, dim=1).numpy())
      return np.concatenate(out)
  out, first, wall = timed(run, args.repeats)
  np.save(args.out, out)
  print(json.dumps({"impl": args.impl, "images": args.images, "wall_s": round(wall, 3),
                    "first_call_s": round(first, 3), "images_per_s": round(args.images / wall, 2),
                    "peak_rss_mb": round(peak_rss_mb(), 1)}))


def main(argv=None):
  args = parse_args(argv)
  if args.impl:
    return child(args)
  import torch
  torch.manual_seed(0)
  model = torch_model(args)
  state = {f"base.{k}": v for k, v in model.state_dict().items()}
  bn = torch.nn.BatchNorm1d(args.dim)
  state.update({f"bottleneck.{k}": v for k, v in bn.state_dict().items()})
  with tempfile.TemporaryDirectory() as tmp:
    path = str(pathlib.Path(tmp) / "part_attention_vit.pth")
    torch.save(state, path)
    argv = [a for a in (argv or sys.argv[1:])] + ["--weights", path]
    results = {impl: run_impl(__file__, argv, impl, tmp) for impl in ("jaxreid", "torch")}
  (jx, jf), (tr, tf) = results["jaxreid"], results["torch"]
  diff = float(np.abs(jf - tf).max()) if jf is not None and tf is not None else None
  print(json.dumps({"summary": "pat_encode", "speedup_jaxreid_vs_torch":
                    round(jx["images_per_s"] / tr["images_per_s"], 2)
                    if "images_per_s" in jx and "images_per_s" in tr else None,
                    "max_abs_diff": diff}))


if __name__ == "__main__":
  main()
