"""The Flax parts every method's model is made of: the feature-map encoder (backbone of
`model.backbone` + optional 3×3 neck conv, optionally followed by Transformer encoder layers)
and the two model shapes the evaluation engine knows (their official checkpoint layouts:
`jaxreid.official`).

- `PairwiseModel` = encoder + matcher: `encode(images)` → feature maps, `match(probe, gallery)` →
  logits [P, G]; variables {"encoder": {"backbone", "neck_conv", …}, "matcher": …}.
- `EmbeddingModel` = encoder + global head: `encode` → vectors [B, D], `match` → cosine [P, G];
  variables {"encoder": …, "head": …}.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid import backbones
from jaxreid.nn.norms import cosine_similarity, l2_normalize
from jaxreid.nn.transformer import TransformerEncoderLayer
from jaxreid.weights import BN_EPS

INPUT_NORMS = {  # (mean, std) applied to [0, 1] pixels
    "none": (0.0, 1.0),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": (0.5, 0.5),
}


def to_unit_range(images):
  """uint8 [0, 255] or float [0, 1] images → float32 [0, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


class FeatureMapEncoder(nn.Module):
  """Pixels → input normalisation → `backbone` → 3×3 neck conv (if `neck`) → per-location L2
  normalisation (if `normalize`).

  `neck_bn`: the neck conv has no bias and is followed by a BatchNorm2d `neck_bn` (batch
  statistics in training), as the official QAConv up to v2.0 (docs/methods/qaconv.md).
  """
  backbone: nn.Module
  neck: int = 128
  input_norm: str = "none"
  dtype: Any = jnp.float32
  normalize: bool = True
  neck_bn: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = self.neck_output(images, train).astype(jnp.float32)
    return l2_normalize(x) if self.normalize else x

  def neck_output(self, images, train: bool):
    """Backbone + neck conv (submodules `backbone`, `neck_conv` of this module)."""
    mean, std = INPUT_NORMS[self.input_norm]
    x = (to_unit_range(images) - jnp.asarray(mean)) / jnp.asarray(std)
    x = self.backbone(x.astype(self.dtype), train)
    if self.neck:
      x = nn.Conv(self.neck, (3, 3), padding=[(1, 1), (1, 1)], use_bias=not self.neck_bn,
                  dtype=self.dtype, name="neck_conv")(x)
      if self.neck_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS,
                         dtype=self.dtype, name="neck_bn")(x)
    return x


class TransformerMapEncoder(FeatureMapEncoder):
  """FeatureMapEncoder followed by post-LN Transformer encoder layers (TransMatcher, and the
  memory side of Transformer-Cross).

  Returns the maps the N decoder layers read, stacked [B, N, h, w, d]: the last N of
  [x, enc1(x), enc2(enc1(x)), …] — with `encoders` = N - 1 (official default) the neck output
  feeds decoder 1; with `encoders` = N (paper Fig. 1) decoder n reads enc_n. `pos_embed` adds a
  learned [h, w, d] positional embedding to x before the encoders (paper Table 3). `map_dtype`:
  dtype of the returned maps (bfloat16 halves the host memory of extracted features, which is
  N·h·w·d per image: 1.2 MB in float32 at full size). `encoder_init`: "xavier" (every layer drawn
  on its own, xavier kernels) or "torch" (PyTorch's nn.TransformerEncoderLayer init, one draw
  shared by every layer as torch nn.TransformerEncoder deep-copies one layer;
  docs/methods/transmatcher.md).
  """
  num_layers: int = 3
  encoders: int = 2
  heads: int = 1
  ffn: int = 2048
  pos_embed: bool = False
  map_dtype: Any = jnp.float32
  encoder_init: str = "xavier"

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
    shared_key = None     # "torch": one key for every layer, so they start identical
    if self.encoder_init == "torch" and self.is_initializing():
      shared_key = self.make_rng("params")
    for i in range(self.encoders):
      seq = TransformerEncoderLayer(self.heads, self.ffn, self.dtype, init_style=self.encoder_init,
                                    init_key=shared_key, name=f"layers_{i}")(seq)
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


class GlobalAveragePooling(nn.Module):
  """[B, h, w, C] → [B, C]: the mean over locations (reid-strong-baseline)."""

  @nn.compact
  def __call__(self, maps):
    return jnp.mean(maps.astype(jnp.float32), axis=(1, 2))


class EmbeddingHead(nn.Module):
  """Feature map → global vector: `pooling` ([B, h, w, C] → [B, C]), Linear(C→dim)
  `projection` (if dim), BNNeck `bottleneck` (BatchNorm1d with a frozen zero bias,
  reid-strong-baseline), bias-free `classifier` over the training ids when `num_classes` > 0.

  Returns (pre-BN vector, post-BN vector, logits or None)."""
  pooling: nn.Module | None    # None: the input is already one vector per image
  dim: int = 256
  num_classes: int = 0

  @nn.compact
  def __call__(self, maps, train: bool = False):
    x = (maps if self.pooling is None else self.pooling(maps)).astype(jnp.float32)
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


def compute_dtype(config):
  """bfloat16 under train.bf16, else float32."""
  return jnp.bfloat16 if config.get("train", {}).get("bf16", False) else jnp.float32


def feature_map_size(model_cfg, height: int, width: int) -> tuple[int, int]:
  """Spatial size of the backbone's map for an input of height × width."""
  return backbones.get(model_cfg).output_size(model_cfg, height, width)


def encoder_fields(config) -> dict:
  """The FeatureMapEncoder fields of `config.model` (backbone of model.backbone, neck,
  input_norm, dtype, and neck_bn when set); a method adds `normalize` and its own."""
  m = config.model
  dtype = compute_dtype(config)
  fields = dict(backbone=backbones.get(m).build(m, dtype), neck=m.neck, input_norm=m.input_norm,
                dtype=dtype)
  if m.get("neck_bn", False):
    fields["neck_bn"] = True
  return fields


def init_variables(model: nn.Module, rng, height: int, width: int):
  """Variables for every submodule (encoder and matcher/head), from two dummy images (jitted:
  eager init of a ResNet takes seconds of op-by-op dispatch)."""
  images = jnp.zeros((2, height, width, 3), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(rng, images)
