"""Method registry: builds the Flax model of a config.

A pairwise matcher model has two entry points, `encode(images) → maps [B, h, w, d]` and
`match(probe_maps, gallery_maps) → logits [P, G]`; its variables are
`{"encoder": {"backbone", "neck_conv"}, "matcher": …}` in both `params` and `batch_stats`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid.backbones.resnet import ResNet
from jaxreid.matchers.qaconv import QAConv

INPUT_NORMS = {  # (mean, std) applied to [0, 1] pixels
    "none": (0.0, 1.0),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": (0.5, 0.5),
}
MATCHER_METHODS = ("qaconv",)


def to_unit_range(images):
  """uint8 [0, 255] or float [0, 1] images → float32 [0, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


class FeatureMapEncoder(nn.Module):
  """Pixels → backbone → 3×3 neck conv → per-location L2 normalisation."""
  depth: int = 50
  ibn: str = "b"
  final_layer: str = "layer3"
  last_stride: int = 2
  width: int = 64
  freeze_bn: bool = True
  neck: int = 128
  input_norm: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    mean, std = INPUT_NORMS[self.input_norm]
    x = (to_unit_range(images) - jnp.asarray(mean)) / jnp.asarray(std)
    x = ResNet(self.depth, self.ibn, self.final_layer, self.last_stride, self.width,
               self.freeze_bn, self.dtype, name="backbone")(x.astype(self.dtype), train)
    if self.neck:
      x = nn.Conv(self.neck, (3, 3), padding=[(1, 1), (1, 1)], dtype=self.dtype,
                  name="neck_conv")(x)
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))


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


def feature_map_size(model_cfg, height: int, width: int) -> tuple[int, int]:
  """Spatial size of the encoder output for an input of height × width."""
  last = 32 if model_cfg.get("last_stride", 2) == 2 else 16
  stride = {"layer2": 8, "layer3": 16, "layer4": last}[model_cfg.final_layer]
  return -(-height // stride), -(-width // stride)


def build_model(config) -> PairwiseModel:
  """The model of `config.model` for inputs of `config.data.height × width`."""
  m = config.model
  if m.name not in MATCHER_METHODS:
    raise ValueError(f"model.name={m.name!r} is unknown; known methods: {MATCHER_METHODS}.")
  dtype = jnp.bfloat16 if config.get("train", {}).get("bf16", False) else jnp.float32
  encoder = FeatureMapEncoder(depth=m.depth, ibn=m.ibn, final_layer=m.final_layer,
                              last_stride=m.get("last_stride", 2), width=m.get("width", 64),
                              freeze_bn=m.freeze_bn, neck=m.neck, input_norm=m.input_norm,
                              dtype=dtype)
  h, w = feature_map_size(m, config.data.height, config.data.width)
  return PairwiseModel(encoder=encoder, matcher=QAConv(h, w, m.head))


def init_variables(model: PairwiseModel, rng, height: int, width: int):
  """Variables for every submodule (encoder and matcher), from two dummy images."""
  images = jnp.zeros((2, height, width, 3), jnp.float32)
  return model.init(rng, images, train=False)
