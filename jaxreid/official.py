"""Official PyTorch checkpoint layouts that several methods share, ↔ the Flax variables of
`models`:

- the official QAConv / TransMatcher feature model: 'base.*' ResNet, 'neck_conv.*' [+ 'neck_bn.*'],
  saved beside the matcher ('criterion' / 'matcher.*'): `split_official`, `neck_variables`,
  `encoder_to_official`;
- reid-strong-baseline's `Baseline` (the embedding method, NFormer's stage 1): 'base.*' ResNet
  without the stem ReLU, 'projection' Linear, 'bottleneck' BNNeck, 'classifier'
  (docs/methods/embedding.md): `baseline_state`, `baseline_from_official`,
  `baseline_to_official`.
"""
from collections.abc import Mapping

import numpy as np

from jaxreid.backbones import resnet
from jaxreid.weights import (BN_EPS, conv_kernel, flatten_state, some, strip_prefix,
                             torch_batch_norm, torch_conv)


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


def neck_variables(model: Mapping):
  """(params, neck channels, input channels) of neck_conv, with an optional neck_bn folded in."""
  w = np.asarray(model["neck_conv.weight"], np.float32)
  kernel = conv_kernel(w)
  bias = np.asarray(model.get("neck_conv.bias", np.zeros(w.shape[0])), np.float32)
  if "neck_bn.weight" in model:  # older official resmap: conv without bias + BatchNorm2d
    scale = (np.asarray(model["neck_bn.weight"], np.float32)
             / np.sqrt(np.asarray(model["neck_bn.running_var"], np.float32) + BN_EPS))
    kernel = kernel * scale
    bias = (bias - np.asarray(model["neck_bn.running_mean"], np.float32)) * scale + np.asarray(
        model["neck_bn.bias"], np.float32)
  return {"kernel": kernel, "bias": bias}, int(w.shape[0]), int(w.shape[1])


def encoder_to_official(variables: Mapping) -> dict:
  """The official feature-model state ('base.*' ResNet, 'neck_conv.*', 'neck_bn.*' when the
  neck has a BN) of the shared encoder's variables; the inverse of `split_official` +
  `neck_variables` for a neck with a bias."""
  params, stats = variables["params"]["encoder"], variables["batch_stats"].get("encoder", {})
  out = resnet.resnet_to_torch(params["backbone"], stats.get("backbone", {}), "base.")
  if "neck_conv" in params:
    out["neck_conv.weight"] = torch_conv(params["neck_conv"]["kernel"])
    if "bias" in params["neck_conv"]:
      out["neck_conv.bias"] = np.asarray(params["neck_conv"]["bias"], np.float32)
  if "neck_bn" in params:
    out.update(torch_batch_norm(params["neck_bn"], stats["neck_bn"], "neck_bn"))
  return out


def baseline_state(state: Mapping) -> dict:
  """The `Baseline` part of a state dict: a bare Baseline, or the 'backbone.*' half of
  NFormer's release file (`nformer_model.pth`, whose other half is 'nformer.*'); a 'module.'
  prefix is stripped. Raises ValueError when there is none."""
  flat = flatten_state(state)
  if flat and all(k.startswith("module.") for k in flat):
    flat = strip_prefix(flat, "module.")
  if any(k.startswith("backbone.base.") for k in flat):
    flat = strip_prefix(flat, "backbone.")
  if "base.conv1.weight" not in flat or "projection.weight" not in flat:
    raise ValueError("no reid-strong-baseline stage-1 model found: expected 'base.conv1.weight' "
                     "and 'projection.weight' (or the same under 'backbone.').")
  return flat


def baseline_from_official(state: Mapping, input_size=(256, 128)):
  """(config overrides, variables) of the embedding model ("gap" pooling) equal to the official
  `Baseline` in eval mode with TEST.NECK_FEAT "after": ResNet (depth, IBN, width from 'base.*')
  without the stem ReLU, last stride 1 (NFormer's LAST_STRIDE; strides are not stored), GAP,
  `projection`, BNNeck `bottleneck` (its bias must be the frozen zero), `classifier`; ImageNet
  input normalisation at `input_size`. Overrides: {"model": {…}, "data": {"height", "width"}}."""
  flat = baseline_state(state)
  flat = {k: v for k, v in flat.items() if not k.endswith("num_batches_tracked")}
  if "bottleneck.weight" not in flat:
    raise ValueError("this Baseline has no BNNeck 'bottleneck' (MODEL.NECK 'no'); only the "
                     "'bnneck' model is supported.")
  if np.any(np.asarray(flat.get("bottleneck.bias", 0)) != 0):
    raise ValueError("bottleneck.bias is not zero: the BNNeck bias of the Baseline is frozen at "
                     "zero.")
  base = {k: v for k, v in flat.items() if k.startswith("base.")}
  arch = resnet.infer_architecture(base, "base.")
  backbone, backbone_stats = resnet.resnet_from_torch(base, "base.", "layer4")
  f32 = lambda k: np.asarray(flat[k], np.float32)
  head = {"projection": {"kernel": f32("projection.weight").T, "bias": f32("projection.bias")},
          "bottleneck": {"scale": f32("bottleneck.weight")}}
  num_classes = 0
  if "classifier.weight" in flat:
    head["classifier"] = {"kernel": f32("classifier.weight").T}
    num_classes = int(flat["classifier.weight"].shape[0])
  unused = sorted(k for k in flat if not k.startswith(("base.", "projection.", "bottleneck.",
                                                       "classifier.")))
  if unused:
    raise ValueError(f"The Baseline has keys the embedding model does not use: {some(unused)}.")
  variables = {"params": {"encoder": {"backbone": backbone}, "head": head},
               "batch_stats": {"encoder": {"backbone": backbone_stats},
                               "head": {"bottleneck": {"mean": f32("bottleneck.running_mean"),
                                                       "var": f32("bottleneck.running_var")}}}}
  overrides = {
      "model": dict(name="embedding", **arch, final_layer="layer4", last_stride=1,
                    stem_relu=False, neck=0, input_norm="imagenet", pooling="gap",
                    embed_dim=int(flat["projection.weight"].shape[0]), num_classes=num_classes,
                    freeze_bn=False),
      "data": dict(height=int(input_size[0]), width=int(input_size[1])),
  }
  return overrides, variables


def baseline_to_official(variables: Mapping) -> dict:
  """The official `Baseline` state dict of an embedding model with "gap" pooling and a
  projection: the inverse of `baseline_from_official`."""
  params, stats = variables["params"], variables["batch_stats"]
  head, head_stats = params["head"], stats["head"]
  out = resnet.resnet_to_torch(params["encoder"]["backbone"],
                               stats["encoder"].get("backbone", {}), "base.")
  scale = np.asarray(head["bottleneck"]["scale"], np.float32)
  out.update({
      "projection.weight": np.asarray(head["projection"]["kernel"], np.float32).T,
      "projection.bias": np.asarray(head["projection"]["bias"], np.float32),
      "bottleneck.weight": scale, "bottleneck.bias": np.zeros_like(scale),
      "bottleneck.running_mean": np.asarray(head_stats["bottleneck"]["mean"], np.float32),
      "bottleneck.running_var": np.asarray(head_stats["bottleneck"]["var"], np.float32)})
  if "classifier" in head:
    out["classifier.weight"] = np.asarray(head["classifier"]["kernel"], np.float32).T
  return out
