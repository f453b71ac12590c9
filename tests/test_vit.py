"""The ViT backbone: ImageNet weights in the timm layout (.pth, .safetensors, original .npz)
converted from a small torch ViT give the same tokens as the torch model after the official
position-embedding resize; that resize equals torch's bilinear interpolation and a per-cell
NumPy reference; the frozen patch embedding is not a parameter; the map output's shape."""
import jax
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxreid import backbones
from jaxreid.backbones import vit
from torch_vit import ViT

DIM, DEPTH, HEADS, PATCH, STRIDE, H, W = 48, 2, 3, 16, 12, 64, 32
GRID = ((H - PATCH) // STRIDE + 1, (W - PATCH) // STRIDE + 1)     # 5 × 2, overlapping


def model_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      backbone="vit", vit_dim=DIM, vit_depth=DEPTH, vit_heads=HEADS, vit_mlp_ratio=4.0,
      vit_qkv_bias=True, vit_qk_scale=0.0, patch_size=PATCH, stride_size=STRIDE, drop_path=0.1,
      part_tokens=0, freeze_patch_embed=False, input_height=H, input_width=W))
  c.update(kw)
  return c


def bilinear_reference(grid, h, w):
  """Per output cell: the half-pixel source coordinate, clamped at 0, blended from its two
  neighbours along each axis (torch's align_corners=False rule), written out cell by cell."""
  gh, gw, c = grid.shape
  out = np.zeros((h, w, c))
  for i in range(h):
    y = max((i + 0.5) * gh / h - 0.5, 0.0)
    y0 = min(int(np.floor(y)), gh - 1)
    y1 = min(y0 + 1, gh - 1)
    for j in range(w):
      x = max((j + 0.5) * gw / w - 0.5, 0.0)
      x0 = min(int(np.floor(x)), gw - 1)
      x1 = min(x0 + 1, gw - 1)
      fy, fx = y - y0, x - x0
      out[i, j] = ((1 - fy) * ((1 - fx) * grid[y0, x0] + fx * grid[y0, x1])
                   + fy * ((1 - fx) * grid[y1, x0] + fx * grid[y1, x1]))
  return out


@pytest.mark.parametrize("size", [(16, 8), (5, 2), (21, 10)])
def test_position_embedding_resize_is_torch_bilinear(size):
  rng = np.random.default_rng(0)
  grid = rng.normal(size=(14, 14, 6)).astype(np.float32)
  got = vit.resize_bilinear(grid, *size)
  want = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=size,
                       mode="bilinear").numpy()[0].transpose(1, 2, 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, bilinear_reference(grid, *size), rtol=1e-5, atol=1e-5)
  # The whole embedding: class entry repeated for the part slots, distillation entry dropped.
  pos = rng.normal(size=(1, 2 + 196, 6)).astype(np.float32)
  full = vit.resize_pos_embed(pos, size, extra=3, lead=2)
  assert full.shape == (1, 4 + size[0] * size[1], 6)
  np.testing.assert_array_equal(full[0, :4], np.repeat(pos[0, :1], 4, axis=0))
  np.testing.assert_allclose(full[0, 4:].reshape(*size, 6), bilinear_reference(
      pos[0, 2:].reshape(14, 14, 6), *size), rtol=1e-5, atol=1e-5)


def torch_reference(src: ViT, dist: bool):
  """The official load_param on a torch model at GRID: distillation entry dropped, grid resized
  by F.interpolate (bilinear), the rest copied."""
  ref = ViT(DIM, DEPTH, HEADS, patch=PATCH, stride=STRIDE, grid=GRID)
  state = {k: v for k, v in src.state_dict().items() if k != "dist_token"}
  pos = state["pos_embed"]
  if dist:
    pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
  cells = pos[0, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
  cells = F.interpolate(cells, size=GRID, mode="bilinear").permute(0, 2, 3, 1)
  state["pos_embed"] = torch.cat([pos[:, :1], cells.reshape(1, -1, DIM)], dim=1)
  ref.load_state_dict(state)
  return ref.eval()


def timm_npz(state):
  """The original ViT release's .npz names of a timm-layout state dict."""
  a = {"cls": state["cls_token"], "Transformer/posembed_input/pos_embedding": state["pos_embed"],
       "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
       "embedding/bias": state["patch_embed.proj.bias"],
       "Transformer/encoder_norm/scale": state["norm.weight"],
       "Transformer/encoder_norm/bias": state["norm.bias"]}
  for i in range(DEPTH):
    p, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    att = p + "MultiHeadDotProductAttention_1/"
    a[p + "LayerNorm_0/scale"], a[p + "LayerNorm_0/bias"] = state[t + "norm1.weight"], state[t + "norm1.bias"]
    a[p + "LayerNorm_2/scale"], a[p + "LayerNorm_2/bias"] = state[t + "norm2.weight"], state[t + "norm2.bias"]
    qkv_w, qkv_b = state[t + "attn.qkv.weight"], state[t + "attn.qkv.bias"]
    for j, n in enumerate(("query", "key", "value")):
      a[f"{att}{n}/kernel"] = qkv_w[j * DIM:(j + 1) * DIM].T.reshape(DIM, HEADS, DIM // HEADS)
      a[f"{att}{n}/bias"] = qkv_b[j * DIM:(j + 1) * DIM].reshape(HEADS, DIM // HEADS)
    a[att + "out/kernel"] = state[t + "attn.proj.weight"].T.reshape(HEADS, DIM // HEADS, DIM)
    a[att + "out/bias"] = state[t + "attn.proj.bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      a[f"{p}MlpBlock_3/Dense_{j}/kernel"] = state[f"{t}mlp.{fc}.weight"].T
      a[f"{p}MlpBlock_3/Dense_{j}/bias"] = state[f"{t}mlp.{fc}.bias"]
  return a


@pytest.mark.parametrize("fmt,dist,freeze", [("pth", True, True), ("safetensors", False, False),
                                             ("npz", False, False)])
def test_imagenet_weights_give_the_torch_tokens(tmp_path, fmt, dist, freeze):
  torch.manual_seed(0)
  src = ViT(DIM, DEPTH, HEADS, patch=PATCH, stride=PATCH, grid=(14, 14), dist=dist)
  state = {k: v.detach() for k, v in src.state_dict().items()}
  state["head.weight"] = torch.zeros(10, DIM)     # classifier heads are dropped
  if dist:
    state["head_dist.weight"] = torch.zeros(10, DIM)
  path = tmp_path / f"deit_tiny_distilled_patch16_224.{fmt}"
  if fmt == "pth":
    torch.save(state, path)
  elif fmt == "safetensors":
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  else:
    np.savez(path, **timm_npz({k: v.numpy() for k, v in state.items() if "head" not in k}))
  cfg = model_cfg(freeze_patch_embed=freeze)
  params, stats = backbones.get(cfg).load_pretrained(str(path), cfg)
  module = vit.from_config(cfg, np.float32)
  assert ("patch_embed_kernel" in stats) == freeze and ("patch_embed_kernel" in params) != freeze
  variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
  shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, H, W, 3), np.float32))
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), shapes, variables)

  x = np.random.default_rng(1).uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_reference(src, dist)(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(module.apply(variables, x, method="tokens"))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  maps = np.asarray(module.apply(variables, x))
  assert maps.shape == (2, *GRID, DIM) == (2, *backbones.get(cfg).output_size(cfg, H, W), DIM)
  np.testing.assert_allclose(maps.reshape(2, -1, DIM), want[:, 1:], rtol=1e-4, atol=1e-4)


def test_wrong_variant_is_one_clear_error(tmp_path):
  src = ViT(DIM, DEPTH, HEADS, patch=PATCH, stride=PATCH, grid=(14, 14))
  path = tmp_path / "vit.pth"
  torch.save(src.state_dict(), path)
  with pytest.raises(ValueError, match="width 48, depth 2.*vit_dim"):
    vit.load_pretrained(str(path), model_cfg(vit_depth=3))
  with pytest.raises(ValueError, match="unknown"):
    vit.variant_fields("vit_huge")


def test_drop_path_and_frozen_patch_embedding():
  cfg = model_cfg(freeze_patch_embed=True, drop_path=0.5)
  module = vit.from_config(cfg, np.float32)
  x = np.random.default_rng(2).uniform(-1, 1, (4, H, W, 3)).astype(np.float32)
  variables = module.init(jax.random.key(0), x)
  assert "patch_embed_kernel" not in variables["params"]
  assert variables["batch_stats"]["patch_embed_kernel"].shape == (PATCH, PATCH, 3, DIM)
  # Frozen: no gradient reaches it (it is not a parameter); drop path only in training.
  a = module.apply(variables, x, train=True, method="tokens", rngs={"dropout": jax.random.key(1)})
  b = module.apply(variables, x, train=True, method="tokens", rngs={"dropout": jax.random.key(2)})
  e = module.apply(variables, x, method="tokens")
  assert not np.allclose(a, b) and np.allclose(e, module.apply(variables, x, method="tokens"))
