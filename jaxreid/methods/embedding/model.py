"""Transformer poolings of the embedding method, feature map [B, h, w, d] → one vector per image
[B, d], for `models.EmbeddingHead` (docs/methods/embedding.md); the plain mean is
`models.GlobalAveragePooling`.

- `ClassTokenEncoder`: ViT-style — a learned class token and positional embedding, N post-LN
  Transformer encoder layers, the class token's output (TransMatcher paper, Table 2 "ViT").
- `LearnedQueryDecoder`: the vanilla Transformer — N encoder layers over the map, then N decoder
  layers whose queries are learned embeddings (DETR-style), the mean of their outputs
  (TransMatcher paper, Table 2 "Transformer").
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxreid.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer, xavier


def _tokens(module: nn.Module, maps, pos_embed: bool):
  """[B, h, w, d] → [B, S, d] (+ a learned positional embedding `pos_embed` [S, d])."""
  b, h, w, d = maps.shape
  x = maps.reshape(b, h * w, d).astype(jnp.float32)
  if pos_embed:
    x = x + module.param("pos_embed", xavier, (h * w, d))
  return x


class ClassTokenEncoder(nn.Module):
  """[cls, tokens + pos] → `num_layers` encoder layers (`layers_i`) → output of `cls`."""
  num_layers: int = 3
  heads: int = 1
  ffn: int = 2048
  pos_embed: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps):
    x = _tokens(self, maps, self.pos_embed)
    cls = self.param("cls", xavier, (1, 1, x.shape[-1]))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
    for i in range(self.num_layers):
      x = TransformerEncoderLayer(self.heads, self.ffn, self.dtype, name=f"layers_{i}")(x)
    return x[:, 0]


class LearnedQueryDecoder(nn.Module):
  """`num_layers` encoder layers (`encoder_i`) over tokens + pos → memory; `num_layers` decoder
  layers (`decoder_i`) from `num_queries` learned `queries` against it; the queries' mean."""
  num_layers: int = 3
  heads: int = 1
  ffn: int = 2048
  num_queries: int = 4
  pos_embed: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps):
    memory = _tokens(self, maps, self.pos_embed)
    for i in range(self.num_layers):
      memory = TransformerEncoderLayer(self.heads, self.ffn, self.dtype,
                                       name=f"encoder_{i}")(memory)
    x = self.param("queries", xavier, (1, self.num_queries, memory.shape[-1]))
    for i in range(self.num_layers):   # one query set against B memories: [1, B, M, d]
      x = TransformerDecoderLayer(self.heads, self.ffn, self.dtype, name=f"decoder_{i}")(x, memory)
    return x[0].mean(axis=1)
