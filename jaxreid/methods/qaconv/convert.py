"""Official QAConv checkpoints (ShengcaiLiao/QAConv, v1.0-eccv to v2.1) → jaxreid variables."""
from collections.abc import Mapping

import ml_collections
import numpy as np

from jaxreid.backbones.resnet import infer_architecture, layers_fitting, resnet_from_torch
from jaxreid.methods import has_key
from jaxreid.models import feature_map_size
from jaxreid.official import encoder_to_official, neck_variables, split_official
from jaxreid.weights import (DEFAULT_INPUT_SIZE, conv_kernel, flatten_state, some, strip_prefix,
                             torch_batch_norm, torch_linear)

_V10_MATCHER = ("bn.", "fc.", "logit_bn.")   # v1.0/v1.1 criterion: QAConvLoss's own layers


def detect(keys) -> bool:
  """An official QAConv checkpoint has the matcher's Linear: 'matcher.fc.weight' (v1.2 on), or
  'criterion.fc.weight' beside 'criterion.logit_bn.weight' (v1.0-eccv, v1.1)."""
  return has_key(keys, "matcher.fc.weight") or (has_key(keys, "criterion.fc.weight") and
                                                has_key(keys, "criterion.logit_bn.weight"))


def _split(ckpt: Mapping) -> tuple[dict, dict]:
  """(feature-model state, matcher state) of any official layout. v1.0-eccv and v1.1 keep the
  matcher's 'bn.*', 'fc.*', 'logit_bn.*' (and the class memory) at the top of 'criterion'."""
  model, matcher = split_official(ckpt)
  if matcher:
    return model, matcher
  if isinstance(ckpt.get("criterion"), Mapping):
    criterion = flatten_state(ckpt["criterion"])
  else:
    criterion = strip_prefix(flatten_state(ckpt), "criterion.")
  return model, {k: v for k, v in criterion.items() if k.startswith(_V10_MATCHER)}


def _require_qaconv(matcher: Mapping) -> None:
  if "fc.weight" not in matcher:
    raise ValueError("This is not a QAConv checkpoint: it has no 'matcher.fc.weight' (expected "
                     "{'model': …, 'criterion': {'matcher.fc.weight', …}}, or v1.0's "
                     "{'criterion': {'fc.weight', …}}); pass the name of the method that wrote "
                     "it.")


def _neck(model: Mapping):
  """(params, batch_stats or None, neck channels, input channels, has neck BN) of the neck.

  A 'neck_bn' (official up to v2.0: conv without bias + BatchNorm2d) stays a BN of its own; a
  conv bias before it, if any, moves into the BN's running mean (BN(x + b) has mean μ − b)."""
  if "neck_bn.weight" not in model:
    params, neck, neck_in = neck_variables(model)
    return params, None, neck, neck_in, False
  w = np.asarray(model["neck_conv.weight"], np.float32)
  f32 = lambda k: np.asarray(model[k], np.float32)
  bias = np.asarray(model.get("neck_conv.bias", np.zeros(w.shape[0])), np.float32)
  params = {"neck_conv": {"kernel": conv_kernel(w)},
            "neck_bn": {"scale": f32("neck_bn.weight"), "bias": f32("neck_bn.bias")}}
  stats = {"neck_bn": {"mean": f32("neck_bn.running_mean") - bias,
                       "var": f32("neck_bn.running_var")}}
  return params, stats, int(w.shape[0]), int(w.shape[1]), True


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

  Layouts: {"model", "criterion": {"matcher.*"}} (v1.2 on), or v1.0-eccv / v1.1's
  {"model", "criterion": {"bn.*", "fc.*", "logit_bn.*", "class_memory"}} (the class memory is
  not kept); either flattened to one dict works too. The backbone depth/IBN/width come from
  'base.*', the neck from 'neck_conv.weight' (with 'neck_bn.*': model.neck_bn), the final
  layer from the neck's input channels, the head from the size of 'matcher.fc.weight': (1, hw)
  is v2.1 and (1, 2hw) is v1, hw being the map size for `input_size` (24×8 for layer3 at
  384×128). Overrides: {"model": {…}, "data": {"height", "width"}}.
  """
  model, matcher = _split(ckpt)
  _require_qaconv(matcher)
  arch = infer_architecture(model, "base.")
  neck_params, neck_stats, neck, neck_in, neck_bn = (
      _neck(model) if "neck_conv.weight" in model else (None, None, 0, None, False))
  geometry = _matcher_geometry(int(np.size(matcher["fc.weight"])),
                               layers_fitting(model, arch, neck_in), input_size)
  backbone, backbone_stats = resnet_from_torch(model, "base.", geometry["final_layer"])
  h, w = geometry["map"]
  matcher_params, matcher_stats = _qaconv_matcher(matcher, geometry["head"], h * w)
  encoder = {"backbone": backbone}
  if neck_params:
    encoder |= neck_params if neck_bn else {"neck_conv": neck_params}
  variables = {"params": {"encoder": encoder, "matcher": matcher_params},
               "batch_stats": {"encoder": {"backbone": backbone_stats} | (neck_stats or {}),
                               "matcher": matcher_stats}}
  unused = sorted(k for k in model if not k.startswith(("base.", "neck_conv.", "neck_bn.")))
  if unused:
    raise ValueError(f"The feature model has keys QAConv does not use: {some(unused)}.")
  overrides = {
      "model": dict(name="qaconv", **arch, final_layer=geometry["final_layer"],
                    last_stride=geometry["last_stride"], neck=neck, neck_bn=neck_bn,
                    head=geometry["head"], input_norm="none"),
      "data": dict(height=int(input_size[0]), width=int(input_size[1])),
  }
  return overrides, variables


def qaconv_to_official(variables: Mapping) -> dict:
  """{"model": feature-model state, "criterion": {"matcher.*"}} as the official QAConv code
  saves it (v1.2 on; a neck BN as 'neck_bn.*'); `qaconv_from_official` of it gives `variables`
  back."""
  params, stats = variables["params"]["matcher"], variables["batch_stats"]["matcher"]
  criterion = {**torch_batch_norm(params["bn"], stats["bn"], "matcher.bn"),
               **torch_linear(params["fc"], "matcher.fc"),
               **torch_batch_norm(params["logit_bn"], stats["logit_bn"], "matcher.logit_bn")}
  return {"model": encoder_to_official(variables), "criterion": criterion}
