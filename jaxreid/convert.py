"""PyTorch / safetensors checkpoints → jaxreid variables.

`read_state_dict` reads a `.pth`/`.pth.tar`/`.pt` file (needs torch) or a `.safetensors` file (does
not) into NumPy. `resnet_from_torch` converts a torchvision / IBN-Net ResNet state dict to the
variables of `jaxreid.backbones.resnet.ResNet`; `qaconv_from_official` converts a whole official
QAConv checkpoint (feature model + matcher) to the variables of `models.build_model`.
"""
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from jaxreid.backbones.resnet import FINAL_LAYERS, STAGES, stage_channels
from jaxreid.models import feature_map_size

TORCH_SUFFIXES = (".pth.tar", ".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
DEFAULT_INPUT_SIZE = (384, 128)   # the official QAConv / TransMatcher input
BN_EPS = 1e-5                     # torch BatchNorm default

_STEM = re.compile(r"^(conv1|bn1)\.(\w+)$")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|IN|downsample\.[01])\.(\w+)$")
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_IN_LEAVES = {"weight": ("params", "norm", "scale"), "bias": ("params", "norm", "bias")}


# ------------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path) -> dict[str, Any]:
  """The tensors of a checkpoint file as NumPy arrays, in the file's own nesting.

  `.pth`, `.pth.tar`, `.pt`: `torch.load(weights_only=True)` (torch imported here only);
  `.safetensors`: the safetensors NumPy reader (a flat dict; torch not needed).
  """
  path = Path(os.path.expanduser(str(path)))
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint file {path} does not exist.")
  if path.is_dir():
    raise ValueError(f"{path} is a directory, not a .pth/.pth.tar/.pt/.safetensors file.")
  name = path.name.lower()
  if name.endswith(SAFETENSORS_SUFFIX):
    return _read_safetensors(path)
  if name.endswith(TORCH_SUFFIXES):
    return _read_torch(path)
  raise ValueError(f"Cannot read {path}: unknown extension; expected .pth, .pth.tar, .pt or "
                   ".safetensors.")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ValueError(f"{path} could not be read as a safetensors file ({e}).") from e


def _read_torch(path: Path) -> dict[str, Any]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch: pip install torch (or convert the file to "
                      ".safetensors, which needs no torch).") from e
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"{path} could not be read as a PyTorch state dict "
                     f"({type(e).__name__}: {e}).") from e
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state dict: it contains a {type(obj).__name__}.")
  state = _torch_to_numpy(obj, torch)
  if not any(isinstance(v, np.ndarray) for v in flatten_state(state).values()):
    raise ValueError(f"{path} does not hold a state dict: it contains no tensors.")
  return state


def _torch_to_numpy(obj, torch):
  """Tensors → NumPy (bfloat16 → float32), recursively through dicts and lists."""
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
  if isinstance(obj, Mapping):
    return {str(k): _torch_to_numpy(v, torch) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_torch_to_numpy(v, torch) for v in obj]
  return obj


def flatten_state(tree, prefix: str = "") -> dict[str, Any]:
  """Nested dicts → one dict with dotted keys ({"a": {"b": x}} → {"a.b": x})."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten_state(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def strip_prefix(state: Mapping, prefix: str) -> dict[str, Any]:
  """The entries whose key starts with `prefix`, with the prefix removed."""
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------
# ResNet


def _conv_kernel(w) -> np.ndarray:
  """torch OIHW → Flax HWIO."""
  return np.transpose(np.asarray(w, np.float32), (2, 3, 1, 0))


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
      value = _conv_kernel(value)
    _set(variables[target[0]], _flax_module(module, layer, index) + target[1:], value)
  if unexpected:
    raise ValueError(f"{len(unexpected)} keys are not part of a torchvision/IBN-b ResNet: "
                     f"{_some(unexpected)}.")
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


def load_pretrained_backbone(path, model_cfg):
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


# ------------------------------------------------------------------------------------------------
# Official checkpoints


def _has(keys, fragment: str) -> bool:
  """Whether some dotted key contains `fragment` at a component boundary."""
  return any(f".{k}".find(f".{fragment}") >= 0 for k in keys)


def detect_method(ckpt: Mapping) -> str | None:
  """The method an official checkpoint belongs to, from its key names (None if unknown)."""
  keys = list(flatten_state(ckpt))
  if (_has(keys, "matcher.decoder") or _has(keys, "decoder_layer.")
      or _has(keys, "encoder.layers.")):
    return "transmatcher"
  if _has(keys, "matcher.fc.weight"):
    return "qaconv"
  if _has(keys, "base.patch_embed.") or _has(keys, "base.cls_token"):
    return "pat"
  if _has(keys, "h.0.attn.c_attn.") or (_has(keys, "projection.") and _has(keys, "base.layer")):
    return "nformer"
  return None


def split_official(ckpt: Mapping) -> tuple[dict, dict]:
  """(feature-model state, matcher state) of an official QAConv/TransMatcher checkpoint.

  Accepts {"model": …, "criterion": {"matcher.…"}} as saved by the official code, or the same
  flattened to one dict (keys "model.…"/"criterion.…", or "base.…"/"neck_conv.…"/"matcher.…").
  """
  if isinstance(ckpt.get("model"), Mapping):
    model = flatten_state(ckpt["model"])
    criterion = flatten_state(ckpt.get("criterion") or {})
  else:
    flat = flatten_state(ckpt)
    model = strip_prefix(flat, "model.") or {
        k: v for k, v in flat.items()
        if isinstance(v, np.ndarray) and not k.startswith(("matcher.", "optim."))}
    criterion = strip_prefix(flat, "criterion.") or flat
  if model and all(k.startswith("module.") for k in model):
    model = strip_prefix(model, "module.")
  return model, strip_prefix(criterion, "matcher.")


def _require_qaconv(ckpt: Mapping, matcher: Mapping) -> None:
  method = detect_method(ckpt)
  if method not in (None, "qaconv"):
    raise ValueError(f"This is not a QAConv checkpoint: it looks like a {method} checkpoint; "
                     f"pass the method name '{method}'.")
  if "fc.weight" not in matcher:
    raise ValueError("This is not a QAConv checkpoint: it has no 'matcher.fc.weight' (expected "
                     "{'model': …, 'criterion': {'matcher.fc.weight', …}}); pass the name of the "
                     "method that wrote it.")


def _neck_variables(model: Mapping):
  """(params, neck channels, input channels) of neck_conv, with an optional neck_bn folded in."""
  w = np.asarray(model["neck_conv.weight"], np.float32)
  kernel = _conv_kernel(w)
  bias = np.asarray(model.get("neck_conv.bias", np.zeros(w.shape[0])), np.float32)
  if "neck_bn.weight" in model:  # older official resmap: conv without bias + BatchNorm2d
    scale = (np.asarray(model["neck_bn.weight"], np.float32)
             / np.sqrt(np.asarray(model["neck_bn.running_var"], np.float32) + BN_EPS))
    kernel = kernel * scale
    bias = (bias - np.asarray(model["neck_bn.running_mean"], np.float32)) * scale + np.asarray(
        model["neck_bn.bias"], np.float32)
  return {"kernel": kernel, "bias": bias}, int(w.shape[0]), int(w.shape[1])


def _final_layers(model: Mapping, arch: dict, in_channels: int | None) -> list[str]:
  """Final-layer candidates, preferred first: the layer whose width feeds the neck, else layer3
  first among those present."""
  present = FINAL_LAYERS[:FINAL_LAYERS.index(deepest_layer(model, "base.")) + 1]
  if in_channels is None:
    return sorted(present, key=lambda name: name != "layer3")
  channels = stage_channels(arch["depth"], arch["width"])
  fits = [name for name in present if channels[int(name[-1]) - 1] == in_channels]
  if not fits:
    raise ValueError(f"neck_conv takes {in_channels} channels, which no layer of the "
                     f"ResNet-{arch['depth']} (channels {channels}) gives.")
  return fits


def _matcher_geometry(fc_in: int, final_layers: list[str], input_size) -> dict:
  """final_layer, last_stride, head and map size that make `fc_in` the fc's input size."""
  tried = []
  for final_layer in final_layers:
    for last_stride in ((2, 1) if final_layer == "layer4" else (2,)):
      cfg = ml_collections.ConfigDict(dict(final_layer=final_layer, last_stride=last_stride))
      h, w = feature_map_size(cfg, *input_size)
      for head, n in (("v2.1", h * w), ("v1", 2 * h * w)):
        if n == fc_in:
          return dict(final_layer=final_layer, last_stride=last_stride, head=head, map=(h, w))
      tried.append(f"{final_layer}: {h}×{w}")
  raise ValueError(f"matcher.fc.weight has {fc_in} inputs, which is neither h·w (head v2.1) nor "
                   f"2·h·w (head v1) of the feature map of a {input_size[0]}×{input_size[1]} input "
                   f"({', '.join(tried)}); pass the input size the model was trained at.")


def _scalar_bn(matcher: Mapping, name: str):
  """({scale, bias}, {mean, var}) of a torch BatchNorm1d(1)."""
  get = lambda leaf: np.asarray(matcher[f"{name}.{leaf}"], np.float32).reshape(1)
  return ({"scale": get("weight"), "bias": get("bias")},
          {"mean": get("running_mean"), "var": get("running_var")})


def _qaconv_matcher(matcher: Mapping, head: str, hw: int):
  """(params, batch_stats) of the Flax QAConv from the official matcher state."""
  missing = [k for k in ("bn.running_mean", "logit_bn.running_mean", "fc.bias") if k not in matcher]
  if missing:
    raise ValueError(f"The QAConv matcher state lacks {['matcher.' + k for k in missing]}.")
  weight = np.asarray(matcher["fc.weight"], np.float32).reshape(-1)
  bn, bn_stats = _scalar_bn(matcher, "bn")
  logit_bn, logit_stats = _scalar_bn(matcher, "logit_bn")
  fc = {"kernel": weight[:, None], "bias": np.asarray(matcher["fc.bias"], np.float32).reshape(1)}
  return ({"bn": bn, "fc": fc, "logit_bn": logit_bn},
          {"bn": bn_stats, "logit_bn": logit_stats})


def qaconv_from_official(ckpt: Mapping, input_size=DEFAULT_INPUT_SIZE):
  """(config overrides, variables) of an official QAConv checkpoint.

  The backbone depth/IBN/width come from 'base.*', the neck from 'neck_conv.weight', the final
  layer from the neck's input channels, the head from the size of 'matcher.fc.weight': (1, hw)
  is v2.1 and (1, 2hw) is v1, hw being the map size for `input_size` (24×8 for layer3 at
  384×128). Overrides: {"model": {…}, "data": {"height", "width"}}.
  """
  model, matcher = split_official(ckpt)
  _require_qaconv(ckpt, matcher)
  arch = infer_architecture(model, "base.")
  neck_params, neck, neck_in = (_neck_variables(model) if "neck_conv.weight" in model
                                else (None, 0, None))
  geometry = _matcher_geometry(int(np.size(matcher["fc.weight"])),
                               _final_layers(model, arch, neck_in), input_size)
  backbone, backbone_stats = resnet_from_torch(model, "base.", geometry["final_layer"])
  h, w = geometry["map"]
  matcher_params, matcher_stats = _qaconv_matcher(matcher, geometry["head"], h * w)
  encoder = {"backbone": backbone} | ({"neck_conv": neck_params} if neck_params else {})
  variables = {"params": {"encoder": encoder, "matcher": matcher_params},
               "batch_stats": {"encoder": {"backbone": backbone_stats}, "matcher": matcher_stats}}
  unused = sorted(k for k in model if not k.startswith(("base.", "neck_conv.", "neck_bn.")))
  if unused:
    raise ValueError(f"The feature model has keys QAConv does not use: {_some(unused)}.")
  overrides = {
      "model": dict(name="qaconv", **arch, final_layer=geometry["final_layer"],
                    last_stride=geometry["last_stride"], neck=neck, head=geometry["head"],
                    input_norm="none"),
      "data": dict(height=int(input_size[0]), width=int(input_size[1])),
  }
  return overrides, variables


# ------------------------------------------------------------------------------------------------
# Checking


def check_variables(expected, variables, what: str = "The checkpoint") -> None:
  """ValueError listing missing, unexpected and wrongly shaped leaves of `variables`.

  `expected`: the model's variables or their shapes (e.g. from `jax.eval_shape`).
  """
  want = traverse_util.flatten_dict(expected, sep="/")
  got = traverse_util.flatten_dict(variables, sep="/")
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  shapes = [f"{k} {tuple(np.shape(got[k]))} (model: {tuple(want[k].shape)})"
            for k in sorted(set(want) & set(got))
            if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  problems = [f"{label}: {_some(items)}" for label, items in
              (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
  if problems:
    raise ValueError(f"{what} does not fit the model; " + "; ".join(problems) + ".")


def _some(items, n: int = 6) -> str:
  items = list(items)
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------------------------
# TransMatcher

_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_ENCODER_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def _linear(state: Mapping, name: str) -> dict:
  """{kernel (in, out), bias} of a torch Linear `name`."""
  return {"kernel": np.asarray(state[f"{name}.weight"], np.float32).T,
          "bias": np.asarray(state[f"{name}.bias"], np.float32)}


def _batch_norm(state: Mapping, name: str):
  """({scale, bias}, {mean, var}) of a torch BatchNorm1d(C), C ≥ 1."""
  get = lambda leaf: np.asarray(state[f"{name}.{leaf}"], np.float32).reshape(-1)
  return ({"scale": get("weight"), "bias": get("bias")},
          {"mean": get("running_mean"), "var": get("running_var")})


def _count(keys, pattern) -> int:
  found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
  if found and found != set(range(max(found) + 1)):
    raise ValueError(f"Layer indices {sorted(found)} are not consecutive from 0.")
  return len(found)


def _encoder_layer(state: Mapping, prefix: str) -> dict:
  """Flax TransformerEncoderLayer params of a torch nn.TransformerEncoderLayer."""
  attn = {"kernel": np.asarray(state[f"{prefix}self_attn.in_proj_weight"], np.float32).T,
          "bias": np.asarray(state[f"{prefix}self_attn.in_proj_bias"], np.float32)}
  norm = lambda name: {"scale": np.asarray(state[f"{prefix}{name}.weight"], np.float32),
                       "bias": np.asarray(state[f"{prefix}{name}.bias"], np.float32)}
  return {"in_proj": attn, "out_proj": _linear(state, f"{prefix}self_attn.out_proj"),
          "linear1": _linear(state, f"{prefix}linear1"),
          "linear2": _linear(state, f"{prefix}linear2"),
          "norm1": norm("norm1"), "norm2": norm("norm2")}


def _transmatcher_matcher(matcher: Mapping, num_layers: int, switches: dict):
  """(params, batch_stats) of the Flax TransMatcher from the official matcher state."""
  params, stats = {}, {}
  for i in range(num_layers):
    p = f"decoder.layers.{i}."
    layer, layer_stats = {}, {}
    if switches["bn1"]:
      layer["bn1"], layer_stats["bn1"] = _batch_norm(matcher, p + "bn1")
    if switches["mlp_head1"]:
      layer["fc2"] = _linear(matcher, p + "fc2")
      layer["bn2"], layer_stats["bn2"] = _batch_norm(matcher, p + "bn2")
    layer["fc3"] = _linear(matcher, p + "fc3")
    layer["bn3"], layer_stats["bn3"] = _batch_norm(matcher, p + "bn3")
    params[f"layers_{i}"], stats[f"layers_{i}"] = layer, layer_stats
  layers = [f"decoder.layers.{i}." for i in range(num_layers)]
  if switches["fc1"]:
    fc1 = [_linear(matcher, p + "fc1") for p in layers]
    params["fc1_kernel"] = np.stack([f["kernel"] for f in fc1])
    params["fc1_bias"] = np.stack([f["bias"] for f in fc1])
  if switches["prior_embed"]:
    # Official score_embed [1, 1, S_gallery, S_probe] (scores are indexed q, k, s, t); ours is
    # probe location × gallery location.
    params["prior"] = np.stack([np.asarray(matcher[p + "score_embed"], np.float32)[0, 0].T
                                for p in layers])
  params["norm"], stats["norm"] = _batch_norm(matcher, "decoder.norm")
  return params, stats


def transmatcher_from_official(ckpt: Mapping, input_size=DEFAULT_INPUT_SIZE):
  """(config overrides, variables) of an official TransMatcher checkpoint.

  Feature model: 'base.*' (ResNet, depth/IBN/width from the keys), 'neck_conv.*' (d),
  'encoder.layers.{i}.*' (post-LN encoder layers, nhead 1); matcher: 'matcher.decoder.layers.{i}.*'
  (N, D from fc2, S from score_embed / fc2 / fc3) and 'matcher.decoder.norm.*'. The Table 3
  switches fc1, bn1, mlp_head1 (fc2+bn2), prior_embed (score_embed) are on when their keys exist.
  The official per-layer template 'matcher.decoder_layer.*' is ignored.
  """
  model, matcher = split_official(ckpt)
  method = detect_method(ckpt)
  if method not in (None, "transmatcher") or not any(_DECODER_LAYER.match(k) for k in matcher):
    raise ValueError(f"This is not a TransMatcher checkpoint (no 'matcher.decoder.layers.*' keys"
                     f"{'; it looks like ' + method if method else ''}); pass the name of the "
                     "method that wrote it.")
  if "neck_conv.weight" not in model:
    raise ValueError("The TransMatcher feature model has no 'neck_conv.weight'.")
  arch = infer_architecture(model, "base.")
  neck_params, d, neck_in = _neck_variables(model)
  final_layer = _final_layers(model, arch, neck_in)[0]
  h, w = feature_map_size(ml_collections.ConfigDict(dict(final_layer=final_layer)), *input_size)
  num_layers = _count(matcher, _DECODER_LAYER)
  encoders = _count(model, _ENCODER_LAYER)
  first = "decoder.layers.0."
  switches = dict(fc1=f"{first}fc1.weight" in matcher, bn1=f"{first}bn1.weight" in matcher,
                  mlp_head1=f"{first}fc2.weight" in matcher,
                  prior_embed=f"{first}score_embed" in matcher)
  fc3_in = int(np.shape(matcher[f"{first}fc3.weight"])[1])
  ffn = int(np.shape(matcher[f"{first}fc2.weight"])[0]) if switches["mlp_head1"] else fc3_in
  seq = int(np.shape(matcher[f"{first}fc2.weight"])[1]) if switches["mlp_head1"] else fc3_in
  if seq != h * w:
    raise ValueError(f"The decoder reads {seq} locations, but a {input_size[0]}×{input_size[1]} "
                     f"input gives a {h}×{w} map at {final_layer}; pass the input size the model "
                     "was trained at.")
  if encoders:
    enc_ffn = int(np.shape(model["encoder.layers.0.linear1.weight"])[0])
    if switches["mlp_head1"] and enc_ffn != ffn:
      raise ValueError(f"Encoder feed-forward width {enc_ffn} differs from the decoder's {ffn}; "
                       "jaxreid uses one width D (model.ffn) for both.")
    ffn = enc_ffn
  backbone, backbone_stats = resnet_from_torch(model, "base.", final_layer)
  encoder = {"backbone": backbone, "neck_conv": neck_params}
  for i in range(encoders):
    encoder[f"layers_{i}"] = _encoder_layer(model, f"encoder.layers.{i}.")
  matcher_params, matcher_stats = _transmatcher_matcher(matcher, num_layers, switches)
  unused = sorted(k for k in model
                  if not k.startswith(("base.", "neck_conv.", "neck_bn.", "encoder.layers.")))
  if unused:
    raise ValueError(f"The feature model has keys TransMatcher does not use: {_some(unused)}.")
  variables = {"params": {"encoder": encoder, "matcher": matcher_params},
               "batch_stats": {"encoder": {"backbone": backbone_stats},
                               "matcher": matcher_stats}}
  overrides = {
      "model": dict(name="transmatcher", **arch, final_layer=final_layer, last_stride=2, neck=d,
                    input_norm="none", ffn=ffn, num_layers=num_layers, encoders=encoders,
                    heads=1, normalize=False, pos_embed=False, **switches),
      "data": dict(height=int(input_size[0]), width=int(input_size[1])),
  }
  return overrides, variables


def nformer_from_official(state: Mapping, heads: int = 2):
  """(architecture {"layers", "dim", "ffn", "heads", "num_classes"}, variables) of an official
  NFormer state dict (`nformer_model.pth`: h.{i}.attn.c_attn.w …, bottleneck.*, classifier.weight;
  a 'nformer.' or 'module.' prefix is stripped). Conv1D `w` is already (in, out); LayerNorm g/b →
  scale/bias; the BNNeck bias must be the frozen zero (our BNNeck has none)."""
  flat = {k: np.asarray(v) for k, v in flatten_state(state).items()
          if not k.endswith("num_batches_tracked")}
  for prefix in ("module.", "nformer."):
    if any(k.startswith(prefix + "h.0.") for k in flat):
      flat = strip_prefix(flat, prefix)
  layers = _count(flat, re.compile(r"h\.(\d+)\.attn\.c_attn\.w$"))
  if not layers:
    raise ValueError("not an NFormer state dict: no 'h.0.attn.c_attn.w' key (expected the "
                     "official nformer_model.pth).")
  dim = flat["h.0.attn.c_attn.w"].shape[0]
  ffn = flat["h.0.mlp.c_fc.w"].shape[1]
  lin = lambda name: {"kernel": flat[f"{name}.w"], "bias": flat[f"{name}.b"]}
  norm = lambda name: {"scale": flat[f"{name}.g"], "bias": flat[f"{name}.b"]}
  params = {f"h_{i}": {"attn": {"c_attn": lin(f"h.{i}.attn.c_attn"),
                                "c_proj": lin(f"h.{i}.attn.c_proj")},
                       "ln_1": norm(f"h.{i}.ln_1"),
                       "mlp": {"c_fc": lin(f"h.{i}.mlp.c_fc"), "c_proj": lin(f"h.{i}.mlp.c_proj")},
                       "ln_2": norm(f"h.{i}.ln_2")} for i in range(layers)}
  if np.any(flat.get("bottleneck.bias", 0) != 0):
    raise ValueError("bottleneck.bias is not zero: the BNNeck bias of NFormer is frozen at zero.")
  params["bottleneck"] = {"scale": flat["bottleneck.weight"]}
  batch_stats = {"bottleneck": {"mean": flat["bottleneck.running_mean"],
                                "var": flat["bottleneck.running_var"]}}
  num_classes = 0
  if "classifier.weight" in flat:
    params["classifier"] = {"kernel": flat["classifier.weight"].T}
    num_classes = flat["classifier.weight"].shape[0]
  arch = {"layers": layers, "dim": dim, "ffn": ffn, "heads": heads, "num_classes": num_classes}
  return arch, {"params": params, "batch_stats": batch_stats}
