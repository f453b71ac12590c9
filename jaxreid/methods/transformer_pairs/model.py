"""Transformer-Cat and Transformer-Cross: the naive pairwise Transformers of the TransMatcher
paper (Liao & Shao, NeurIPS 2021, Sec. 4 and Table 2), as pairwise matchers
(docs/methods/transformer_pairs.md).

- Transformer-Cat: a probe map and a gallery map, concatenated into one sequence, go through
  ViT-style post-LN encoder layers, so self-attention mixes the two images; all Transformer
  layers work on pairs, the encoder side is only backbone + neck.
- Transformer-Cross: the vanilla Transformer with the probe's neck map as the decoder queries:
  N encoder layers turn each gallery map into a memory (once per image, in `encode`), N post-LN
  decoder layers (self-attention over the probe tokens, cross-attention to the memory, FFN)
  work on pairs.

Neither has dropout. Every ≥2-D matcher parameter is xavier-uniform initialised, biases as
PyTorch (as in `TransMatcher`).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxreid.models import TransformerMapEncoder
from jaxreid.nn.norms import ScalarBatchNorm
from jaxreid.nn.transformer import (TransformerDecoderLayer, TransformerEncoderLayer, dense_layer,
                                    xavier)


def _check_maps(name, probe, gallery, expected):
  if probe.shape[1:-1] != expected or gallery.shape[1:] != probe.shape[1:]:
    dims = ", ".join(map(str, expected))
    raise ValueError(f"{name} was built for maps [B, {dims}, d]; got probe {probe.shape} and "
                     f"gallery {gallery.shape}.")


def _readout(x, train):
  """[P, G, d] pair vectors → Linear(d→1) `head` → scalar BN `norm` → logits [P, G]."""
  x = dense_layer(1, x.shape[-1], jnp.float32, "head")(x.astype(jnp.float32))[..., 0]
  return ScalarBatchNorm(name="norm")(x, train)


class TransformerCat(nn.Module):
  """Pair logits [P, G] from neck maps [P, h, w, d] and [G, h, w, d].

  Sequence of a pair (2S + 1 tokens): [cls, probe_t + pos_t + seg_0, gallery_t + pos_t + seg_1]
  with a learned class token `cls` [1, d], a learned positional embedding `pos_embed` [S, d]
  shared by the two images (same grid location → same code; off: no positional code) and
  learned segment embeddings `segment` [2, d] telling probe from gallery. N post-LN encoder
  layers (`layers_i`, H heads, FFN D); readout: the class token's output → Linear(d→1) → scalar
  BN. Swapping probe and gallery only permutes the tokens (which attention ignores) and swaps
  the segment codes, so the score matrix transposes exactly when seg_0 = seg_1.
  """
  height: int
  width: int
  num_layers: int = 2
  heads: int = 1
  ffn: int = 512
  pos_embed: bool = True
  dtype: Any = jnp.float32
  encoder_init: str = "xavier"     # "torch": PyTorch's init, every layer a copy of one

  @nn.compact
  def __call__(self, probe, gallery, train: bool = False):
    _check_maps("Transformer-Cat", probe, gallery, (self.height, self.width))
    s, d = self.height * self.width, probe.shape[-1]
    p = probe.reshape(probe.shape[0], s, d).astype(jnp.float32)
    g = gallery.reshape(gallery.shape[0], s, d).astype(jnp.float32)
    segment = self.param("segment", xavier, (2, d))
    if self.pos_embed:
      pos = self.param("pos_embed", xavier, (s, d))
      p, g = p + pos, g + pos
    p, g = p + segment[0], g + segment[1]
    num_p, num_g = p.shape[0], g.shape[0]
    cls = self.param("cls", xavier, (1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (num_p, num_g, 1, d)),
                         jnp.broadcast_to(p[:, None], (num_p, num_g, s, d)),
                         jnp.broadcast_to(g[None], (num_p, num_g, s, d))], axis=2)
    x = x.reshape(num_p * num_g, 2 * s + 1, d)
    shared_key = None     # "torch": one key for every layer, so they start identical
    if self.encoder_init == "torch" and self.is_initializing():
      shared_key = self.make_rng("params")
    for i in range(self.num_layers):
      x = TransformerEncoderLayer(self.heads, self.ffn, self.dtype, init_style=self.encoder_init,
                                  init_key=shared_key, name=f"layers_{i}")(x)
    return _readout(x[:, 0].reshape(num_p, num_g, d), train)


class ProbeMemoryEncoder(TransformerMapEncoder):
  """`TransformerMapEncoder` (with `num_layers` = encoders + 1) that keeps only the first and
  last maps: [B, 2, h, w, d] = [neck output (the probe's decoder queries), enc_N(…) (the
  gallery's memory)]."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    return super().__call__(images, train)[:, jnp.array([0, self.num_layers - 1])]


class TransformerCross(nn.Module):
  """Pair logits [P, G] from `ProbeMemoryEncoder` maps [P, 2, h, w, d] and [G, 2, h, w, d].

  The probe's neck map (index 0) is the decoder input; the gallery's encoder output (index 1)
  is the memory. N `TransformerDecoderLayer`s (`layers_i`); readout: a pair vector from the
  last layer's output → Linear(d→1) → scalar BN, the vector being (`readout`) "mean" (default)
  or "max" over the S probe tokens, or "cls": the output of a learned query token `cls` [1, d]
  prepended to the probe tokens (DETR-like). The first decoder layer's self-attention and query
  projection see only the probe, so they run once per probe map. Not symmetric: the probe
  enters raw, the gallery encoded.
  """
  height: int
  width: int
  num_layers: int = 2
  heads: int = 1
  ffn: int = 512
  readout: str = "mean"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, probe, gallery, train: bool = False):
    _check_maps("Transformer-Cross", probe, gallery, (2, self.height, self.width))
    s, d = self.height * self.width, probe.shape[-1]
    x = probe[:, 0].reshape(probe.shape[0], s, d).astype(self.dtype)
    memory = gallery[:, 1].reshape(gallery.shape[0], s, d).astype(self.dtype)
    if self.readout == "cls":
      cls = self.param("cls", xavier, (1, d)).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)
    for i in range(self.num_layers):
      x = TransformerDecoderLayer(self.heads, self.ffn, self.dtype, name=f"layers_{i}")(x, memory)
    if self.readout not in ("mean", "max", "cls"):
      raise ValueError(f"model.readout={self.readout!r} is unknown; use 'mean', 'max' or 'cls'.")
    if self.readout == "cls":
      return _readout(x[:, :, 0], train)
    if self.readout == "max":
      return _readout(x.max(axis=2), train)
    return _readout(x.mean(axis=2), train)
