"""ResNet-18…152 in the torchvision layout, with optional IBN-b and frozen BN statistics.

Module names follow torchvision (`conv1`, `bn1`, `layer{i}_{j}/conv1`, `…/downsample_conv`) so that
official PyTorch weights map one to one (see `jaxreid.convert`).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
FINAL_LAYERS = ("layer2", "layer3", "layer4")


def stage_channels(depth: int, width: int = 64) -> list[int]:
  """Output channels of layer1..layer4."""
  expansion = 4 if STAGES[depth][0] == "bottleneck" else 1
  return [width * 2**i * expansion for i in range(4)]


class InstanceNorm(nn.Module):
  """Affine InstanceNorm2d (torch eps 1e-5) over H, W per channel."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, dtype=self.dtype,
                        name="norm")(x)


class Block(nn.Module):
  """A basic (2 convs) or bottleneck (3 convs, stride on the 3×3) residual block."""
  kind: str
  planes: int
  stride: int
  downsample: bool
  ibn_after_add: bool
  norm: Any
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = lambda c, k, s, name: nn.Conv(c, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2,
                                         use_bias=False, dtype=self.dtype, name=name)
    if self.kind == "basic":
      y = nn.relu(self.norm(name="bn1")(conv(self.planes, 3, self.stride, "conv1")(x)))
      y = self.norm(name="bn2")(conv(self.planes, 3, 1, "conv2")(y))
      out_ch = self.planes
    else:
      y = nn.relu(self.norm(name="bn1")(conv(self.planes, 1, 1, "conv1")(x)))
      y = nn.relu(self.norm(name="bn2")(conv(self.planes, 3, self.stride, "conv2")(y)))
      out_ch = self.planes * 4
      y = self.norm(name="bn3")(conv(out_ch, 1, 1, "conv3")(y))
    if self.downsample:
      x = self.norm(name="downsample_bn")(conv(out_ch, 1, self.stride, "downsample_conv")(x))
    y = y + x
    if self.ibn_after_add:
      y = InstanceNorm(dtype=self.dtype, name="IN")(y)
    return nn.relu(y)


class ResNet(nn.Module):
  """Returns the feature map after `final_layer` ([B, h, w, C], NHWC).

  `freeze_bn`: BN layers always normalise with their running statistics (γ, β still train),
  as the QAConv/TransMatcher code does with ImageNet-initialised backbones.
  """
  depth: int = 50
  ibn: str = "none"          # "none" | "b"
  final_layer: str = "layer3"
  last_stride: int = 2
  width: int = 64
  freeze_bn: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in STAGES:
      raise ValueError(f"model.depth={self.depth} is not a ResNet depth; use one of {sorted(STAGES)}.")
    if self.ibn not in ("none", "b"):
      raise ValueError(f"model.ibn={self.ibn!r} is unknown; use 'none' or 'b'.")
    if self.ibn == "b" and self.depth == 152:
      raise ValueError("IBN-b is not defined for ResNet-152; use model.ibn='none' or another depth.")
    if self.final_layer not in FINAL_LAYERS:
      raise ValueError(f"model.final_layer={self.final_layer!r}; use one of {FINAL_LAYERS}.")
    kind, blocks = STAGES[self.depth]
    norm = lambda name: nn.BatchNorm(use_running_average=self.freeze_bn or not train,
                                     momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=name)
    ibn_b = self.ibn == "b"
    x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                dtype=self.dtype, name="conv1")(x)
    x = InstanceNorm(dtype=self.dtype, name="bn1")(x) if ibn_b else norm("bn1")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
    num_layers = FINAL_LAYERS.index(self.final_layer) + 2
    in_ch = self.width
    for i in range(num_layers):
      planes = self.width * 2**i
      out_ch = planes * (4 if kind == "bottleneck" else 1)
      stride = 1 if i == 0 else (self.last_stride if i == 3 else 2)
      for j in range(blocks[i]):
        first = j == 0
        x = Block(kind, planes, stride if first else 1,
                  downsample=first and (stride != 1 or in_ch != out_ch),
                  ibn_after_add=ibn_b and i < 2 and j == blocks[i] - 1,
                  norm=norm, dtype=self.dtype, name=f"layer{i + 1}_{j}")(x)
        in_ch = out_ch
    return x
