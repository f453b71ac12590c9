"""A small PyTorch transcription of the TransReID-style ViT that PAT's official code uses (pre-LN
blocks, GELU, LayerNorm eps 1e-6, overlapping patch conv), with optional part tokens and an
attention mask applied as the official part attention does (masked logits −1000, softmax, weights
× mask). Built in the tests as an independent reference for the JAX ViT and PAT."""
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
  def __init__(self, dim, heads, qkv_bias=True, qk_scale=None):
    super().__init__()
    self.heads, self.scale = heads, qk_scale or (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, mask=None):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * self.scale
    if mask is not None:
      attn = attn.masked_fill(~mask.bool(), -1e3)
    attn = attn.softmax(-1)
    if mask is not None:
      attn = attn * mask
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads, mlp_ratio, qkv_bias, qk_scale, attn_name="attn"):
    super().__init__()
    self.attn_name = attn_name
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    setattr(self, attn_name, Attention(dim, heads, qkv_bias, qk_scale))
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x, mask=None):
    x = x + getattr(self, self.attn_name)(self.norm1(x), mask)
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, dim, patch, stride):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=stride)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
  """grid: (h, w) patch grid; parts: number of part tokens (part_token1…); dist: a
  distillation token (DeiT); attn_name "part_attn" for PAT's layout."""

  def __init__(self, dim=48, depth=2, heads=3, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
               patch=16, stride=16, grid=(14, 14), parts=0, dist=False, attn_name="attn"):
    super().__init__()
    self.parts = parts
    self.patch_embed = PatchEmbed(dim, patch, stride)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    for i in range(parts):
      setattr(self, f"part_token{i + 1}", nn.Parameter(torch.randn(1, 1, dim) * 0.02))
    lead = 1 + parts + (1 if dist else 0)
    if dist:
      self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, lead + grid[0] * grid[1], dim) * 0.02)
    self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias, qk_scale, attn_name)
                                for _ in range(depth))
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():   # non-trivial LayerNorm parameters and biases
      for m in self.modules():
        if isinstance(m, nn.LayerNorm):
          m.weight.add_(torch.randn_like(m.weight) * 0.1)
          m.bias.add_(torch.randn_like(m.bias) * 0.1)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
          m.bias.add_(torch.randn_like(m.bias) * 0.05)

  def forward(self, x, mask=None):
    """Normalised NCHW pixels → all tokens after the final norm."""
    x = self.patch_embed(x)
    b = x.shape[0]
    lead = [self.cls_token] + [getattr(self, f"part_token{i + 1}") for i in range(self.parts)]
    x = torch.cat([t.expand(b, -1, -1) for t in lead] + [x], dim=1) + self.pos_embed
    for blk in self.blocks:
      x = blk(x, mask)
    return self.norm(x)


def official_eval_mask(h, w):
  """PAT's official attn_mask_generate with its deterministic (full-band) rectangles, built with
  the official outer products in torch: [4 + h·w, 4 + h·w] float, 1 = may attend."""
  n = 4 + h * w
  ones = torch.ones(n, 1)
  ones[1:4, 0] = 0
  mask = (ones @ ones.t()).bool()
  for part, (top, height) in enumerate(((0, h / 2), (h / 4, h / 2), (h / 2, h / 2)), start=1):
    top, height = int(top), int(height)
    grid = torch.zeros(h, w)
    grid[top:top + height + 1, 0:w + 1] = 1
    vec = torch.zeros(n)
    vec[4:] = grid.flatten()
    vec[part] = 1
    mask |= (vec[:, None] @ vec[None, :]).bool()
  mask[1:4, 0] = True
  mask[0, 1:4] = True
  return mask.float()
