"""Method registry: builds the Flax model of a config.

Every model has two entry points the evaluation engine uses, `encode(images)` and
`match(probe, gallery) → scores [P, G]` (higher = more similar):
- a pairwise matcher encodes feature maps [B, h, w, d] (TransMatcher: one map per decoder layer,
  [B, N, h, w, d]) and matches pairs of maps; variables `{"encoder": {"backbone", "neck_conv",
  …}, "matcher": …}`;
- an embedding model (`EmbeddingModel`) encodes vectors [B, D] and matches by cosine similarity;
  variables `{"encoder": {"backbone", …}, "head": …}`.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid import poolings
from jaxreid.backbones.resnet import ResNet
from jaxreid.matchers.qaconv import QAConv
from jaxreid.matchers.transmatcher import TransformerEncoderLayer, TransMatcher

INPUT_NORMS = {  # (mean, std) applied to [0, 1] pixels
    "none": (0.0, 1.0),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": (0.5, 0.5),
}


def l2_normalize(x, axis: int = -1):
  """x / ‖x‖ along `axis` in float32 (‖x‖ floored at 1e-12, torch.nn.functional.normalize)."""
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True), 1e-24))


def to_unit_range(images):
  """uint8 [0, 255] or float [0, 1] images → float32 [0, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


class FeatureMapEncoder(nn.Module):
  """Pixels → backbone → 3×3 neck conv → per-location L2 normalisation (if `normalize`)."""
  depth: int = 50
  ibn: str = "b"
  final_layer: str = "layer3"
  last_stride: int = 2
  width: int = 64
  freeze_bn: bool = True
  neck: int = 128
  input_norm: str = "none"
  dtype: Any = jnp.float32
  normalize: bool = True

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = self.neck_output(images, train).astype(jnp.float32)
    return l2_normalize(x) if self.normalize else x

  def neck_output(self, images, train: bool):
    """Backbone + neck conv (submodules `backbone`, `neck_conv` of this module)."""
    mean, std = INPUT_NORMS[self.input_norm]
    x = (to_unit_range(images) - jnp.asarray(mean)) / jnp.asarray(std)
    x = ResNet(self.depth, self.ibn, self.final_layer, self.last_stride, self.width,
               self.freeze_bn, self.dtype, name="backbone")(x.astype(self.dtype), train)
    if self.neck:
      x = nn.Conv(self.neck, (3, 3), padding=[(1, 1), (1, 1)], dtype=self.dtype,
                  name="neck_conv")(x)
    return x


class TransformerMapEncoder(FeatureMapEncoder):
  """FeatureMapEncoder followed by post-LN Transformer encoder layers (TransMatcher).

  Returns the maps the N decoder layers read, stacked [B, N, h, w, d]: the last N of
  [x, enc1(x), enc2(enc1(x)), …] — with `encoders` = N - 1 (official default) the neck output
  feeds decoder 1; with `encoders` = N (paper Fig. 1) decoder n reads enc_n. `pos_embed` adds a
  learned [h, w, d] positional embedding to x before the encoders (paper Table 3). `map_dtype`:
  dtype of the returned maps (bfloat16 halves the host memory of extracted features, which is
  N·h·w·d per image: 1.2 MB in float32 at full size).
  """
  num_layers: int = 3
  encoders: int = 2
  heads: int = 1
  ffn: int = 2048
  pos_embed: bool = False
  map_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.encoders not in (self.num_layers - 1, self.num_layers):
      raise ValueError(f"model.encoders={self.encoders} must be model.num_layers - 1 "
                       f"({self.num_layers - 1}) or model.num_layers ({self.num_layers}).")
    x = self.neck_output(images, train).astype(jnp.float32)
    if self.normalize:
      x = l2_normalize(x)
    if self.pos_embed:
      x = x + self.param("pos_embed", nn.initializers.normal(0.02), x.shape[1:], jnp.float32)
    b, h, w, d = x.shape
    seq, outputs = x.reshape(b, h * w, d), [x.reshape(b, h * w, d)]
    for i in range(self.encoders):
      seq = TransformerEncoderLayer(self.heads, self.ffn, self.dtype, name=f"layers_{i}")(seq)
      outputs.append(seq)
    maps = jnp.stack(outputs[-self.num_layers:], axis=1).reshape(b, self.num_layers, h, w, d)
    return maps.astype(self.map_dtype)


class PairwiseModel(nn.Module):
  """A feature-map encoder plus a pairwise matcher."""
  encoder: nn.Module
  matcher: nn.Module

  def encode(self, images, train: bool = False):
    return self.encoder(images, train)

  def match(self, probe, gallery, train: bool = False):
    return self.matcher(probe, gallery, train)

  def __call__(self, images, train: bool = False):
    maps = self.encode(images, train)
    return self.match(maps, maps, train)


class EmbeddingHead(nn.Module):
  """Feature map → global vector: `pooling` (a `jaxreid.poolings` module), Linear(C→dim)
  `projection` (if dim), BNNeck `bottleneck` (BatchNorm1d with a frozen zero bias,
  reid-strong-baseline), bias-free `classifier` over the training ids when `num_classes` > 0.

  Returns (pre-BN vector, post-BN vector, logits or None)."""
  pooling: nn.Module
  dim: int = 256
  num_classes: int = 0

  @nn.compact
  def __call__(self, maps, train: bool = False):
    x = self.pooling(maps).astype(jnp.float32)
    if self.dim:
      x = nn.Dense(self.dim, name="projection")(x)
    post = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        use_bias=False, name="bottleneck")(x)
    logits = None
    if self.num_classes:
      logits = nn.Dense(self.num_classes, use_bias=False, name="classifier",
                        kernel_init=nn.initializers.normal(0.001))(post)
    return x, post, logits


class EmbeddingModel(nn.Module):
  """A feature-map encoder plus a global head: `encode` → post-BN vectors [B, D] (the official
  eval features), `match` → cosine similarities [P, G], `train_outputs` → (pre-BN vectors for the
  metric losses, classifier logits)."""
  encoder: nn.Module
  head: nn.Module

  def encode(self, images, train: bool = False):
    return self.head(self.encoder(images, train), train)[1]

  def train_outputs(self, images):
    pre, _, logits = self.head(self.encoder(images, True), True)
    return pre, logits

  def match(self, probe, gallery, train: bool = False):
    return cosine_similarity(probe, gallery)

  def __call__(self, images, train: bool = False):
    pre, post, logits = self.head(self.encoder(images, train), train)
    return post


def cosine_similarity(a, b):
  """[P, D] × [G, D] → [P, G] cosine similarities."""
  return l2_normalize(a) @ l2_normalize(b).T


def feature_map_size(model_cfg, height: int, width: int) -> tuple[int, int]:
  """Spatial size of the encoder output for an input of height × width."""
  last = 32 if model_cfg.get("last_stride", 2) == 2 else 16
  stride = {"layer2": 8, "layer3": 16, "layer4": last}[model_cfg.final_layer]
  return -(-height // stride), -(-width // stride)


def build_model(config) -> nn.Module:
  """The model of `config.model` for inputs of `config.data.height × width`."""
  m = config.model
  if m.name not in METHODS:
    raise ValueError(f"model.name={m.name!r} is unknown; known methods: {sorted(METHODS)}.")
  dtype = jnp.bfloat16 if config.get("train", {}).get("bf16", False) else jnp.float32
  common = dict(depth=m.depth, ibn=m.ibn, final_layer=m.final_layer,
                last_stride=m.get("last_stride", 2), width=m.get("width", 64),
                freeze_bn=m.freeze_bn, neck=m.neck, input_norm=m.input_norm, dtype=dtype)
  h, w = feature_map_size(m, config.data.height, config.data.width)
  return METHODS[m.name](m, common, h, w)


def _qaconv(m, common: dict, h: int, w: int) -> PairwiseModel:
  return PairwiseModel(encoder=FeatureMapEncoder(**common), matcher=QAConv(h, w, m.head))


def _transmatcher(m, common: dict, h: int, w: int) -> PairwiseModel:
  if not m.neck:
    raise ValueError("TransMatcher needs a neck (model.neck = d > 0).")
  encoder = TransformerMapEncoder(**common, normalize=m.get("normalize", False),
                                  num_layers=m.num_layers, encoders=m.encoders, heads=m.heads,
                                  ffn=m.ffn, pos_embed=m.pos_embed,
                                  map_dtype=jnp.dtype(m.get("map_dtype", "float32")))
  matcher = TransMatcher(h, w, num_layers=m.num_layers, ffn=m.ffn, fc1=m.fc1, bn1=m.bn1,
                         mlp_head1=m.mlp_head1, prior_embed=m.prior_embed, dtype=common["dtype"])
  return PairwiseModel(encoder=encoder, matcher=matcher)


POOLINGS = ("gap", "vit", "decoder")


def _embedding(m, common: dict, h: int, w: int) -> "EmbeddingModel":
  kind = m.get("pooling", "gap")
  if kind not in POOLINGS:
    raise ValueError(f"model.pooling={kind!r} is unknown; use one of {POOLINGS}.")
  if kind != "gap" and not m.neck:
    raise ValueError(f"model.pooling={kind!r} needs a neck (model.neck = d > 0).")
  if kind == "gap":
    pooling = poolings.GlobalAveragePooling()
  else:
    layers = dict(num_layers=m.num_layers, heads=m.heads, ffn=m.ffn, pos_embed=m.pos_embed,
                  dtype=common["dtype"])
    pooling = (poolings.ClassTokenEncoder(**layers) if kind == "vit" else
               poolings.LearnedQueryDecoder(**layers, num_queries=m.num_queries))
  head = EmbeddingHead(pooling, m.embed_dim, m.get("num_classes", 0))
  encoder = FeatureMapEncoder(**common, normalize=m.get("normalize", False))
  return EmbeddingModel(encoder=encoder, head=head)


# Imported here, not at the top: transformer_pairs subclasses the encoders defined above.
from jaxreid.matchers.transformer_pairs import (  # noqa: E402
    _transformer_cat, _transformer_cross)

# model.name → builder(model config, common encoder fields, map height, map width).
METHODS = {"qaconv": _qaconv, "transmatcher": _transmatcher, "embedding": _embedding,
           "transformer_cat": _transformer_cat, "transformer_cross": _transformer_cross}


EMBEDDING_METHODS = ("embedding",)


def is_embedding(model_cfg) -> bool:
  """Whether `model.name` is an embedding method (vectors, cosine scores) or a pairwise matcher."""
  return model_cfg.name in EMBEDDING_METHODS


def init_variables(model: nn.Module, rng, height: int, width: int):
  """Variables for every submodule (encoder and matcher), from two dummy images (jitted: eager
  init of a ResNet takes seconds of op-by-op dispatch)."""
  images = jnp.zeros((2, height, width, 3), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(rng, images)
