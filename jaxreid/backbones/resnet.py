"""ResNet-18…152 in the torchvision layout, with optional IBN-b and frozen BN statistics, and its
conversion from torchvision / IBN-Net state dicts (ImageNet weights, the `base.*` of official
re-id checkpoints).

Module names follow torchvision (`conv1`, `bn1`, `layer{i}_{j}/conv1`, `…/downsample_conv`) so that
PyTorch weights map one to one.
"""
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxreid.weights import (conv_kernel, flatten_state, read_state_dict, some, strip_prefix,
                             torch_batch_norm, torch_conv)

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
  stem_relu: bool = True     # False: conv1 → bn1 → maxpool (reid-strong-baseline's ResNet)

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
    if self.stem_relu:
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


def output_size(model_cfg, height: int, width: int) -> tuple[int, int]:
  """Spatial size of the map after model.final_layer for an input of height × width."""
  last = 32 if model_cfg.get("last_stride", 2) == 2 else 16
  stride = {"layer2": 8, "layer3": 16, "layer4": last}[model_cfg.final_layer]
  return -(-height // stride), -(-width // stride)


def from_config(model_cfg, dtype) -> ResNet:
  """The ResNet of the model config's depth, ibn, final_layer, last_stride, width, freeze_bn,
  stem_relu (default True)."""
  return ResNet(model_cfg.depth, model_cfg.ibn, model_cfg.final_layer,
                model_cfg.get("last_stride", 2), model_cfg.get("width", 64), model_cfg.freeze_bn,
                dtype, stem_relu=bool(model_cfg.get("stem_relu", True)))


def describe(model_cfg) -> str:
  return f"ResNet-{model_cfg.depth} ibn={model_cfg.ibn}, {model_cfg.final_layer}"


# ------------------------------------------------------------------------------------------------
# torchvision / IBN-Net state dicts

_STEM = re.compile(r"^(conv1|bn1)\.(\w+)$")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|IN|downsample\.[01])\.(\w+)$")
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_IN_LEAVES = {"weight": ("params", "norm", "scale"), "bias": ("params", "norm", "bias")}


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = np.asarray(value, np.float32)


def _flax_module(torch_module: str, layer: str | None, block: str | None) -> tuple:
  name = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
      torch_module, torch_module)
  return (name,) if layer is None else (f"layer{layer}_{block}", name)


def _leaf(torch_module: str, leaf: str, stem_is_instance_norm: bool):
  """(collection, *suffix) of a torch leaf, or None when it has no Flax counterpart."""
  if torch_module.startswith("conv") or torch_module == "downsample.0":
    return ("params", "kernel") if leaf == "weight" else None
  if torch_module == "IN" or (torch_module == "bn1" and stem_is_instance_norm):
    return _IN_LEAVES.get(leaf)
  return _BN_LEAVES.get(leaf)


def resnet_from_torch(state: Mapping, prefix: str = "", final_layer: str = "layer4"):
  """(params, batch_stats) of the Flax ResNet from a torchvision / IBN-Net state dict.

  Keys are read under `prefix` (e.g. "base."); `num_batches_tracked`, the ImageNet classifier
  `fc.*` and the layers after `final_layer` are ignored. A stem `bn1` without running statistics
  is IBN-b's InstanceNorm. Any other key raises ValueError.
  """
  if final_layer not in FINAL_LAYERS:
    raise ValueError(f"final_layer={final_layer!r}; use one of {FINAL_LAYERS}.")
  last = int(final_layer[-1])
  state = strip_prefix(state, prefix)
  stem_in = "bn1.weight" in state and "bn1.running_mean" not in state
  variables, unexpected = {"params": {}, "batch_stats": {}}, []
  for key, value in state.items():
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
      continue
    stem, block = _STEM.match(key), _BLOCK.match(key)
    if stem:
      layer, index, module, leaf = None, None, *stem.groups()
    elif block:
      layer, index, module, leaf = block.groups()
      if int(layer) > last:
        continue
    else:
      unexpected.append(prefix + key)
      continue
    target = _leaf(module, leaf, stem_in and layer is None)
    if target is None:
      unexpected.append(prefix + key)
      continue
    if target[-1] == "kernel":
      value = conv_kernel(value)
    _set(variables[target[0]], _flax_module(module, layer, index) + target[1:], value)
  if unexpected:
    raise ValueError(f"{len(unexpected)} keys are not part of a torchvision/IBN-b ResNet: "
                     f"{some(unexpected)}.")
  return variables["params"], variables["batch_stats"]


def block_counts(state: Mapping, prefix: str = "") -> list[int]:
  """Residual blocks in layer1, layer2, … (only the layers present, in order)."""
  counts = []
  for i in range(1, 5):
    found = {int(m.group(1)) for k in state
             if (m := re.match(rf"^{re.escape(prefix)}layer{i}\.(\d+)\.", k))}
    if not found:
      break
    counts.append(max(found) + 1)
  return counts


def infer_architecture(state: Mapping, prefix: str = "base.") -> dict:
  """dict(depth, ibn, width) of the ResNet stored under `prefix`, from key names and shapes."""
  if f"{prefix}conv1.weight" not in state:
    raise ValueError(f"No ResNet found: the state dict has no '{prefix}conv1.weight'.")
  if any(re.match(rf"^{re.escape(prefix)}layer\d\.\d+\.bn1\.(IN|BN)\.", k) for k in state):
    raise ValueError("This ResNet is IBN-a (keys 'layer*.*.bn1.IN.*'); only IBN-b and plain "
                     "ResNets are supported.")
  counts = block_counts(state, prefix)
  if not counts:
    raise ValueError(f"No residual layers found under '{prefix}layer1.'.")
  kind = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in state else "basic"
  depths = [d for d, (k, blocks) in sorted(STAGES.items())
            if k == kind and list(blocks[:len(counts)]) == counts]
  if not depths:
    raise ValueError(f"A {kind} ResNet with {counts} blocks per layer matches no depth of "
                     f"{sorted(STAGES)}.")
  has_in = any(re.match(rf"^{re.escape(prefix)}layer\d\.\d+\.IN\.", k) for k in state)
  stem_in = f"{prefix}bn1.running_mean" not in state
  return dict(depth=depths[0], ibn="b" if has_in or stem_in else "none",
              width=int(state[f"{prefix}conv1.weight"].shape[0]))


def deepest_layer(state: Mapping, prefix: str = "") -> str:
  """The last of layer2/3/4 present in the state dict."""
  n = len(block_counts(state, prefix))
  if n < 2:
    raise ValueError(f"The ResNet under '{prefix}' stops before layer2; jaxreid needs layer2 "
                     "or deeper.")
  return f"layer{n}"


def load_pretrained(path, model_cfg):
  """(params, batch_stats) of the ResNet of `model_cfg` from ImageNet weights (`model.pretrained`).

  Accepts a bare torchvision / IBN-Net state dict or one under 'base.' / 'module.'; raises
  ValueError when its depth, IBN or width differs from `model_cfg`.
  """
  state = flatten_state(read_state_dict(path))
  prefix = next((p for p in ("", "module.", "base.", "module.base.")
                 if f"{p}conv1.weight" in state), None)
  if prefix is None:
    raise ValueError(f"{path} holds no ResNet: there is no 'conv1.weight' key.")
  arch = infer_architecture(state, prefix)
  wanted = dict(depth=model_cfg.depth, ibn=model_cfg.ibn, width=model_cfg.get("width", 64))
  if arch != wanted:
    raise ValueError(f"{path} is a ResNet with {arch}, but the config has {wanted}; set "
                     "model.depth/ibn/width to match or use other weights.")
  return resnet_from_torch(state, prefix, model_cfg.final_layer)


def layers_fitting(model: Mapping, arch: dict, in_channels: int | None) -> list[str]:
  """Final-layer candidates of the ResNet under "base." of `model` (`arch` from
  `infer_architecture`), preferred first: the layers whose width is `in_channels` (what a neck
  conv takes), else layer3 first among those present."""
  present = FINAL_LAYERS[:FINAL_LAYERS.index(deepest_layer(model, "base.")) + 1]
  if in_channels is None:
    return sorted(present, key=lambda name: name != "layer3")
  channels = stage_channels(arch["depth"], arch["width"])
  fits = [name for name in present if channels[int(name[-1]) - 1] == in_channels]
  if not fits:
    raise ValueError(f"neck_conv takes {in_channels} channels, which no layer of the "
                     f"ResNet-{arch['depth']} (channels {channels}) gives.")
  return fits


def resnet_to_torch(params: Mapping, batch_stats: Mapping, prefix: str = "") -> dict:
  """The torchvision / IBN-Net state dict (keys under `prefix`) of the Flax ResNet's variables:
  the inverse of `resnet_from_torch`."""
  out = {}

  def emit(name: str, leaves: Mapping, stats: Mapping | None) -> None:
    if "kernel" in leaves:
      out[f"{prefix}{name}.weight"] = torch_conv(leaves["kernel"])
    elif "norm" in leaves:                               # IBN-b's affine InstanceNorm
      out[f"{prefix}{name}.weight"] = np.asarray(leaves["norm"]["scale"], np.float32)
      out[f"{prefix}{name}.bias"] = np.asarray(leaves["norm"]["bias"], np.float32)
    else:
      out.update(torch_batch_norm(leaves, stats, f"{prefix}{name}"))

  for top, sub in params.items():
    if not top.startswith("layer"):
      emit(top, sub, batch_stats.get(top))
      continue
    layer, block = top[len("layer"):].split("_")
    for name, leaves in sub.items():
      torch_name = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
          name, name)
      emit(f"layer{layer}.{block}.{torch_name}", leaves, batch_stats.get(top, {}).get(name))
  return out
