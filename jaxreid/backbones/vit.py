"""Vision Transformer backbone (`model.backbone = "vit"`): the ViT-B/16, ViT-S/16 and DeiT-T/S/B
family in the layout PAT's official code uses (TransReID-style ViT; docs/methods/pat.md), with
overlapping patches when `model.stride_size` < `model.patch_size`, stochastic depth
(`model.drop_path`), an optional frozen patch embedding, and optional extra "part" tokens after
the class token (PAT).

As a backbone (`__call__`) it maps normalised pixels [B, H, W, 3] to the map of its patch tokens
[B, h, w, C] after the final LayerNorm; `tokens` gives the whole sequence [cls, parts…, patches]
and takes an attention mask (PAT's part-aware attention).

ImageNet weights (`model.pretrained`) are read from local files in the timm / original layouts:
`.pth` (e.g. jx_vit_base_p16_224-80ecf9dd.pth, deit_small_distilled_patch16_224-649709d9.pth),
`.safetensors`, or the `.npz` of the original ViT release. The 14×14 position embedding is
resized bilinearly to the patch grid, a distillation token is dropped, and the class token (and
its position embedding) is copied to the part slots.

A frozen patch embedding (`model.freeze_patch_embed`, PAT's FREEZE_PATCH_EMBED) is kept in the
non-trained `batch_stats` collection, so neither gradients nor weight decay touch it.
"""
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxreid.weights import conv_kernel, flatten_state, read_state_dict, some

# name: (dim, depth, heads, mlp_ratio, qkv_bias, qk_scale or 0 for head_dim ** -0.5)
VARIANTS = {
    "vit_base": (768, 12, 12, 4.0, True, 0.0),
    "vit_small": (768, 8, 8, 3.0, False, 768 ** -0.5),
    "deit_base": (768, 12, 12, 4.0, True, 0.0),
    "deit_small": (384, 12, 6, 4.0, True, 0.0),
    "deit_tiny": (192, 12, 3, 4.0, True, 0.0),
}
LN_EPS = 1e-6
trunc02 = nn.initializers.truncated_normal(0.02)


def variant_fields(name: str) -> dict:
  """The model-config fields of a named variant (vit_dim, vit_depth, vit_heads, vit_mlp_ratio,
  vit_qkv_bias, vit_qk_scale)."""
  if name not in VARIANTS:
    raise ValueError(f"ViT variant {name!r} is unknown; use one of {sorted(VARIANTS)}.")
  dim, depth, heads, ratio, bias, scale = VARIANTS[name]
  return dict(vit_dim=dim, vit_depth=depth, vit_heads=heads, vit_mlp_ratio=ratio,
              vit_qkv_bias=bias, vit_qk_scale=scale)


def grid_size(height: int, width: int, patch: int, stride: int) -> tuple[int, int]:
  """Patch grid of a height × width input: (H − patch) // stride + 1 per side."""
  if height < patch or width < patch:
    raise ValueError(f"data.height × width = {height}×{width} is smaller than one patch "
                     f"(model.patch_size={patch}).")
  return (height - patch) // stride + 1, (width - patch) // stride + 1


def masked_softmax(logits, mask):
  """PAT's masked attention weights: masked logits set to −1000, softmax, then the masked
  weights zeroed (paper Sec. 3.1; docs/methods/pat.md). `mask` broadcasts against `logits`."""
  logits = jnp.where(mask, logits, -1e3)
  return jax.nn.softmax(logits, axis=-1) * mask


class Attention(nn.Module):
  dim: int
  heads: int
  qkv_bias: bool
  qk_scale: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    b, n, d = x.shape
    hd = d // self.heads
    scale = self.qk_scale or hd ** -0.5
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, kernel_init=trunc02, dtype=self.dtype,
                   name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.heads, hd), 2, 0)   # [B, n, h, hd]
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) * scale
    if mask is None:
      weights = jax.nn.softmax(logits, axis=-1)
    else:
      mask = jnp.asarray(mask, bool)
      weights = masked_softmax(logits, mask[:, None] if mask.ndim == 3 else mask)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights.astype(self.dtype), v).reshape(b, n, d)
    return nn.Dense(d, kernel_init=trunc02, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, kernel_init=trunc02, dtype=self.dtype, name="fc1")(x)
    x = jax.nn.gelu(x, approximate=False)
    return nn.Dense(d, kernel_init=trunc02, dtype=self.dtype, name="fc2")(x)


def drop_path(x, rate: float, rng):
  """Stochastic depth: each sample's residual branch dropped with probability `rate`, the kept
  ones scaled by 1 / (1 − rate)."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nn.Module):
  """Pre-LN ViT block: x + Attn(LN(x)), then x + MLP(LN(x)), each branch under drop path."""
  dim: int
  heads: int
  mlp_ratio: float
  qkv_bias: bool
  qk_scale: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    def branch(y):
      if train and self.drop_path > 0:
        return drop_path(y, self.drop_path, self.make_rng("dropout"))
      return y
    ln = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=name)
    x = x + branch(Attention(self.dim, self.heads, self.qkv_bias, self.qk_scale, self.dtype,
                             name="attn")(ln("norm1")(x), mask))
    x = x + branch(Mlp(int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(ln("norm2")(x)))
    return x


class VisionTransformer(nn.Module):
  """ViT on [B, H, W, 3] normalised pixels. Parameters (timm names): patch_embed (Conv, kernel
  `patch`, stride `stride`), cls_token [1, 1, D], part_tokens [1, P, D] (P = `part_tokens`,
  initialised as copies of the class token), pos_embed [1, 1 + P + h·w, D], blocks_i, norm."""
  dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: float = 0.0
  patch: int = 16
  stride: int = 16
  drop_path: float = 0.0
  part_tokens: int = 0
  freeze_patch_embed: bool = False
  dtype: Any = jnp.float32

  def __call__(self, x, train: bool = False):
    """The patch tokens after the final LayerNorm as a map [B, h, w, D]."""
    b, height, width, _ = x.shape
    h, w = grid_size(height, width, self.patch, self.stride)
    tokens = self.tokens(x, train)
    return tokens[:, 1 + self.part_tokens:].reshape(b, h, w, self.dim)

  @nn.compact
  def tokens(self, x, train: bool = False, mask=None, dtype=None, norm_dtype=None):
    """[cls, part_1…part_P, patches] after the final LayerNorm, float32 [B, 1 + P + h·w, D];
    `mask` [N, N] or [B, N, N] (True = may attend) restricts every block's attention. `dtype`
    computes the patch embedding and blocks, `norm_dtype` the final LayerNorm, in this call
    (default: the module's dtype)."""
    if self.dim % self.heads:
      raise ValueError(f"model.vit_dim={self.dim} is not divisible by model.vit_heads="
                       f"{self.heads}.")
    dtype = dtype or self.dtype
    x = self.patch_embed(x.astype(dtype), dtype)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param("cls_token", trunc02, (1, 1, d), jnp.float32)
    extra = [cls]
    if self.part_tokens:
      parts = self.param("part_tokens", lambda key, shape: jnp.tile(cls, (1, shape[1], 1)),
                         (1, self.part_tokens, d))
      extra.append(parts)
    lead = jnp.broadcast_to(jnp.concatenate(extra, axis=1).astype(dtype),
                            (b, 1 + self.part_tokens, d))
    x = jnp.concatenate([lead, x], axis=1)
    pos = self.param("pos_embed", trunc02, (1, x.shape[1], d), jnp.float32)
    x = x + pos.astype(dtype)
    rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth > 1 else [0.0]
    for i in range(self.depth):
      x = Block(self.dim, self.heads, self.mlp_ratio, self.qkv_bias, self.qk_scale,
                float(rates[i]), dtype, name=f"blocks_{i}")(x, mask, train)
    norm = nn.LayerNorm(epsilon=LN_EPS, dtype=norm_dtype or self.dtype, name="norm")
    return norm(x).astype(jnp.float32)

  def patch_embed(self, x, dtype):
    """Conv(patch × patch, stride) over the image, VALID padding: [B, h, w, D]."""
    cin = x.shape[-1]
    k = (self.patch, self.patch, cin, self.dim)
    fan_out = self.patch * self.patch * self.dim      # the official conv init N(0, 2 / fan_out)
    kernel_init = nn.initializers.normal(math.sqrt(2.0 / fan_out))
    if self.freeze_patch_embed:
      init_rng = self.make_rng("params") if self.is_initializing() else None
      kernel = self.variable("batch_stats", "patch_embed_kernel",
                             lambda: kernel_init(init_rng, k, jnp.float32)).value
      bias = self.variable("batch_stats", "patch_embed_bias",
                           lambda: jnp.zeros((self.dim,), jnp.float32)).value
    else:
      kernel = self.param("patch_embed_kernel", kernel_init, k, jnp.float32)
      bias = self.param("patch_embed_bias", nn.initializers.zeros, (self.dim,), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(dtype), (self.stride, self.stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(dtype)


def from_config(model_cfg, dtype) -> VisionTransformer:
  """The ViT of model.vit_* (see `variant_fields`), patch_size, stride_size, drop_path,
  part_tokens, freeze_patch_embed."""
  m = model_cfg
  return VisionTransformer(
      dim=int(m.vit_dim), depth=int(m.vit_depth), heads=int(m.vit_heads),
      mlp_ratio=float(m.vit_mlp_ratio), qkv_bias=bool(m.vit_qkv_bias),
      qk_scale=float(m.get("vit_qk_scale", 0.0)), patch=int(m.patch_size),
      stride=int(m.get("stride_size", m.patch_size)), drop_path=float(m.get("drop_path", 0.0)),
      part_tokens=int(m.get("part_tokens", 0)),
      freeze_patch_embed=bool(m.get("freeze_patch_embed", False)), dtype=dtype)


def output_size(model_cfg, height: int, width: int) -> tuple[int, int]:
  """The patch grid (h, w) for an input of height × width."""
  return grid_size(height, width, int(model_cfg.patch_size),
                   int(model_cfg.get("stride_size", model_cfg.patch_size)))


def describe(model_cfg) -> str:
  m = model_cfg
  return (f"ViT {m.vit_dim}×{m.vit_depth}, heads {m.vit_heads}, patch {m.patch_size} stride "
          f"{m.get('stride_size', m.patch_size)}")


# ------------------------------------------------------------------------------------------------
# ImageNet weights


def resize_bilinear(grid, height: int, width: int) -> np.ndarray:
  """[h, w, C] → [height, width, C], bilinear with half-pixel centres and no antialiasing (as
  torch F.interpolate(mode='bilinear', align_corners=False), which the official code uses)."""
  grid = np.asarray(grid, np.float64)

  def axis(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

  r0, r1, fr = axis(grid.shape[0], height)
  c0, c1, fc = axis(grid.shape[1], width)
  rows = grid[r0] * (1 - fr)[:, None, None] + grid[r1] * fr[:, None, None]
  out = rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]
  return out.astype(np.float32)


def resize_pos_embed(pos, grid: tuple[int, int], extra: int, lead: int = 1) -> np.ndarray:
  """A pretrained [1, lead + g·g, D] position embedding → [1, 1 + extra + h·w, D]: the class
  token's entry (the first; the others of `lead`, e.g. a distillation token, dropped) repeated
  1 + `extra` times, the g × g grid bilinearly resized to `grid`."""
  pos = np.asarray(pos, np.float32).reshape(-1, np.shape(pos)[-1])
  token, cells = pos[:1], pos[lead:]
  g = int(round(math.sqrt(cells.shape[0])))
  if g * g != cells.shape[0]:
    raise ValueError(f"The pretrained position embedding has {cells.shape[0]} grid entries, "
                     "not a square grid.")
  h, w = grid
  if (g, g) != (h, w):
    cells = resize_bilinear(cells.reshape(g, g, -1), h, w).reshape(h * w, -1)
  return np.concatenate([np.repeat(token, 1 + extra, axis=0), cells], axis=0)[None]


_NPZ_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")


def npz_to_timm(arrays) -> dict:
  """The original ViT release's .npz (Flax names) → timm's state-dict names and torch shapes."""
  a = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
  out = {"cls_token": a["cls"], "pos_embed": a["Transformer/posembed_input/pos_embedding"],
         "patch_embed.proj.weight": np.transpose(a["embedding/kernel"], (3, 2, 0, 1)),
         "patch_embed.proj.bias": a["embedding/bias"],
         "norm.weight": a["Transformer/encoder_norm/scale"],
         "norm.bias": a["Transformer/encoder_norm/bias"]}
  depth = 1 + max(int(m.group(1)) for k in a if (m := _NPZ_BLOCK.match(k)))
  for i in range(depth):
    p, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    att = p + "MultiHeadDotProductAttention_1/"
    for j, ln in ((0, "norm1"), (2, "norm2")):
      out[f"{t}{ln}.weight"] = a[f"{p}LayerNorm_{j}/scale"]
      out[f"{t}{ln}.bias"] = a[f"{p}LayerNorm_{j}/bias"]
    d = a[att + "query/kernel"].shape[0]
    out[f"{t}attn.qkv.weight"] = np.concatenate(
        [a[f"{att}{n}/kernel"].reshape(d, d).T for n in ("query", "key", "value")])
    out[f"{t}attn.qkv.bias"] = np.concatenate(
        [a[f"{att}{n}/bias"].reshape(d) for n in ("query", "key", "value")])
    out[f"{t}attn.proj.weight"] = a[att + "out/kernel"].reshape(-1, d).T
    out[f"{t}attn.proj.bias"] = a[att + "out/bias"]
    for j, fc in ((0, "fc1"), (1, "fc2")):
      out[f"{t}mlp.{fc}.weight"] = a[f"{p}MlpBlock_3/Dense_{j}/kernel"].T
      out[f"{t}mlp.{fc}.bias"] = a[f"{p}MlpBlock_3/Dense_{j}/bias"]
  return out


def read_weights(path) -> dict:
  """A timm-layout state dict (NumPy) from a .pth / .safetensors / original-release .npz file;
  a 'model' or 'state_dict' wrapper and a 'module.' prefix are removed."""
  if str(path).lower().endswith(".npz"):
    full = os.path.expanduser(str(path))
    if not os.path.exists(full):
      raise FileNotFoundError(f"Checkpoint file {full} does not exist.")
    with np.load(full) as z:
      return npz_to_timm(dict(z))
  state = read_state_dict(path)
  for wrapper in ("model", "state_dict"):
    if isinstance(state.get(wrapper), dict):
      state = state[wrapper]
  state = flatten_state(state)
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def timm_to_flax(state, grid: tuple[int, int], part_tokens: int = 0,
                 freeze_patch_embed: bool = False, attn_name: str = "attn") -> tuple[dict, dict]:
  """(params, batch_stats) of `VisionTransformer` from a timm-layout ViT/DeiT state dict:
  classifier heads ('head', 'head_dist', 'pre_logits') and the distillation token dropped, the
  position embedding resized to `grid` (see `resize_pos_embed`), part tokens (if any) copied
  from the class token. `attn_name`: the blocks' attention module name ('part_attn' in PAT's
  official checkpoints)."""
  f32 = lambda k: np.asarray(state[k], np.float32)
  if "cls_token" not in state or "patch_embed.proj.weight" not in state:
    raise ValueError("no ViT found: expected 'cls_token' and 'patch_embed.proj.weight' keys.")
  dim = f32("cls_token").shape[-1]
  w = f32("patch_embed.proj.weight")
  if w.ndim < 4:   # older timm models: a Linear patch projection
    p = int(round(math.sqrt(w.size // (dim * 3))))
    w = w.reshape(dim, 3, p, p)
  cls = f32("cls_token").reshape(1, 1, dim)
  lead = 2 if "dist_token" in state else 1
  params = {"cls_token": cls, "norm": {"scale": f32("norm.weight"), "bias": f32("norm.bias")}}
  have_parts = [f"part_token{i + 1}" for i in range(part_tokens) if f"part_token{i + 1}" in state]
  pos = f32("pos_embed")
  if pos.shape[1] == 1 + part_tokens + grid[0] * grid[1] and lead == 1 and (
      have_parts or not part_tokens):
    params["pos_embed"] = pos        # already this model's layout (a PAT checkpoint)
  else:
    params["pos_embed"] = resize_pos_embed(pos, grid, part_tokens, lead)
  if part_tokens:
    params["part_tokens"] = (np.concatenate([f32(k).reshape(1, 1, dim) for k in have_parts], 1)
                             if len(have_parts) == part_tokens
                             else np.repeat(cls, part_tokens, axis=1))
  depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k)))
  for i in range(depth):
    t = f"blocks.{i}."
    lin = lambda name: {"kernel": f32(f"{t}{name}.weight").T, "bias": f32(f"{t}{name}.bias")}
    qkv = {"kernel": f32(f"{t}{attn_name}.qkv.weight").T}
    if f"{t}{attn_name}.qkv.bias" in state:
      qkv["bias"] = f32(f"{t}{attn_name}.qkv.bias")
    params[f"blocks_{i}"] = {
        "norm1": {"scale": f32(f"{t}norm1.weight"), "bias": f32(f"{t}norm1.bias")},
        "norm2": {"scale": f32(f"{t}norm2.weight"), "bias": f32(f"{t}norm2.bias")},
        "attn": {"qkv": qkv, "proj": lin(f"{attn_name}.proj")},
        "mlp": {"fc1": lin("mlp.fc1"), "fc2": lin("mlp.fc2")}}
  embed = {"patch_embed_kernel": conv_kernel(w), "patch_embed_bias": f32("patch_embed.proj.bias")}
  if freeze_patch_embed:
    return params, embed
  params.update(embed)
  return params, {}


def load_pretrained(path, model_cfg) -> tuple[dict, dict]:
  """(params, batch_stats) of the ViT of `model_cfg` from ImageNet weights (`model.pretrained`);
  ValueError when the file's width, depth or patch size differs from the config."""
  state = read_weights(path)
  state = {k: v for k, v in state.items()
           if not k.startswith(("head", "pre_logits", "fc."))}
  dim = int(np.shape(state.get("cls_token", np.zeros((1, 1, 0))))[-1])
  depth = len({m.group(1) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
  w = np.shape(state.get("patch_embed.proj.weight", ()))
  patch = int(w[-1]) if len(w) == 4 else int(model_cfg.patch_size)
  want = (int(model_cfg.vit_dim), int(model_cfg.vit_depth), int(model_cfg.patch_size))
  if (dim, depth, patch) != want:
    raise ValueError(f"{path} is a ViT of width {dim}, depth {depth}, patch {patch}, but the "
                     f"config has model.vit_dim/vit_depth/patch_size = {want}; use the matching "
                     "variant or other weights.")
  unknown = sorted(k for k in state if not k.startswith(
      ("cls_token", "dist_token", "pos_embed", "patch_embed.", "blocks.", "norm.")))
  if unknown:
    raise ValueError(f"{path} has keys a ViT does not use: {some(unknown)}.")
  return timm_to_flax(state, _grid_of(model_cfg), int(model_cfg.get("part_tokens", 0)),
                      bool(model_cfg.get("freeze_patch_embed", False)))


def _grid_of(model_cfg) -> tuple[int, int]:
  """The patch grid of the input size the config's model is built for (model.input_height /
  input_width, which the method's config sets equal to data.height / width; default 256×128)."""
  return output_size(model_cfg, int(model_cfg.get("input_height", 256)),
                     int(model_cfg.get("input_width", 128)))
