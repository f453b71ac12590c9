"""The official PAT checkpoint (`model.state_dict()` of `build_part_attention_vit`, as the
official processor saves it) ↔ PAT's variables (docs/methods/pat.md).

The official trainer writes two kinds of file, both plain state dicts: per-epoch files of the
training model (a classifier of one row per training id; keys prefixed 'module.' under
distributed training) and, at the end, the final file of the evaluation model, built with no
classes: 'classifier.weight' of shape (0, D). A classifier with no rows loads as a model
without one (num_classes = 0).

Layout: 'base.*' the part-attention ViT (cls_token, part_token1…3, pos_embed [1, 4 + h·w, D],
patch_embed.proj, blocks.i.{norm1, part_attn.qkv, part_attn.proj, norm2, mlp.fc1, mlp.fc2}, norm,
and an unused 'fc' head), 'bottleneck.*' the BNNeck, 'classifier.weight'. The variant is read from
the shapes (width, depth, patch, MLP ratio, qkv bias; heads = width / 64, or 8 for ViT-S/16,
which has no qkv bias and an MLP ratio of 3) and the stride from the number of patches at
`input_size`.
"""
import numpy as np

from jaxreid.backbones import vit
from jaxreid.methods import has_key
from jaxreid.weights import flatten_state, strip_prefix, torch_conv, torch_linear


def detect(keys) -> bool:
  return has_key(keys, "base.part_token1") and has_key(keys, "part_attn.qkv")


def _stride(patch: int, tokens: int, height: int, width: int) -> int:
  for s in range(patch, 0, -1):
    if ((height - patch) // s + 1) * ((width - patch) // s + 1) == tokens:
      return s
  raise ValueError(f"no patch stride gives {tokens} patches of size {patch} at {height}×{width}; "
                   "pass the input size the model was trained at.")


def convert(state, input_size):
  flat = flatten_state(state)
  if flat and all(k.startswith("module.") for k in flat):
    flat = strip_prefix(flat, "module.")
  flat = {k: v for k, v in flat.items() if not k.endswith("num_batches_tracked")}
  base = strip_prefix(flat, "base.")
  if "cls_token" not in base or "part_token1" not in base:
    raise ValueError("no PAT model found: expected 'base.cls_token' and 'base.part_token1'.")
  height, width = int(input_size[0]), int(input_size[1])
  f32 = lambda k: np.asarray(flat[k], np.float32)
  dim = int(np.shape(base["cls_token"])[-1])
  patch = int(np.shape(base["patch_embed.proj.weight"])[-1])
  depth = len({k.split(".")[1] for k in base if k.startswith("blocks.")})
  ratio = np.shape(base["blocks.0.mlp.fc1.weight"])[0] / dim
  qkv_bias = "blocks.0.part_attn.qkv.bias" in base
  small = (dim, depth, ratio, qkv_bias) == (768, 8, 3.0, False)
  stride = _stride(patch, np.shape(base["pos_embed"])[1] - 4, height, width)
  model = dict(name="pat", backbone="vit", vit_dim=dim, vit_depth=depth,
               vit_heads=8 if small else max(1, dim // 64), vit_mlp_ratio=float(ratio),
               vit_qkv_bias=qkv_bias, vit_qk_scale=768 ** -0.5 if small else 0.0,
               patch_size=patch, stride_size=stride, part_tokens=3, freeze_patch_embed=False,
               input_norm="half", neck=0, num_classes=0, input_height=height,
               input_width=width)
  grid = vit.grid_size(height, width, patch, stride)
  used = {k: v for k, v in base.items() if not k.startswith("fc.")}
  backbone, _ = vit.timm_to_flax(used, grid, part_tokens=3, attn_name="part_attn")
  head = {"bottleneck": {"scale": f32("bottleneck.weight")}}
  if np.any(f32("bottleneck.bias") != 0):
    raise ValueError("bottleneck.bias is not zero: PAT's BNNeck bias is frozen at zero.")
  if "classifier.weight" in flat and np.shape(flat["classifier.weight"])[0] > 0:
    head["classifier"] = {"kernel": f32("classifier.weight").T}
    model["num_classes"] = int(flat["classifier.weight"].shape[0])
  variables = {"params": {"encoder": {"backbone": backbone}, "head": head},
               "batch_stats": {"head": {"bottleneck": {"mean": f32("bottleneck.running_mean"),
                                                       "var": f32("bottleneck.running_var")}}}}
  return {"model": model, "data": dict(height=height, width=width)}, variables


def export(variables) -> dict:
  """The official state dict of PAT's variables (`convert`'s inverse)."""
  p = variables["params"]
  stats = variables.get("batch_stats", {})
  bb = p["encoder"]["backbone"]
  frozen = stats.get("encoder", {}).get("backbone", {})
  a = lambda x: np.asarray(x, np.float32)
  out = {"base.cls_token": a(bb["cls_token"]), "base.pos_embed": a(bb["pos_embed"]),
         "base.norm.weight": a(bb["norm"]["scale"]), "base.norm.bias": a(bb["norm"]["bias"])}
  for i in range(3):
    out[f"base.part_token{i + 1}"] = a(bb["part_tokens"])[:, i:i + 1]
  embed = frozen if "patch_embed_kernel" in frozen else bb
  out["base.patch_embed.proj.weight"] = torch_conv(embed["patch_embed_kernel"])
  out["base.patch_embed.proj.bias"] = a(embed["patch_embed_bias"])
  i = 0
  while f"blocks_{i}" in bb:
    blk, t = bb[f"blocks_{i}"], f"base.blocks.{i}."
    for ln in ("norm1", "norm2"):
      out[f"{t}{ln}.weight"], out[f"{t}{ln}.bias"] = a(blk[ln]["scale"]), a(blk[ln]["bias"])
    out.update(torch_linear(blk["attn"]["qkv"], f"{t}part_attn.qkv"))
    out.update(torch_linear(blk["attn"]["proj"], f"{t}part_attn.proj"))
    out.update(torch_linear(blk["mlp"]["fc1"], f"{t}mlp.fc1"))
    out.update(torch_linear(blk["mlp"]["fc2"], f"{t}mlp.fc2"))
    i += 1
  head, hs = p["head"], stats["head"]["bottleneck"]
  scale = a(head["bottleneck"]["scale"])
  out.update({"bottleneck.weight": scale, "bottleneck.bias": np.zeros_like(scale),
              "bottleneck.running_mean": a(hs["mean"]), "bottleneck.running_var": a(hs["var"])})
  if "classifier" in head:
    out["classifier.weight"] = a(head["classifier"]["kernel"]).T
  return out
