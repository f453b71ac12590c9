"""Official TransMatcher checkpoints (ShengcaiLiao/TransMatcher) → jaxreid variables."""
import re
from collections.abc import Mapping

import ml_collections
import numpy as np

from jaxreid.backbones.resnet import infer_architecture, layers_fitting, resnet_from_torch
from jaxreid.methods import has_key
from jaxreid.models import feature_map_size
from jaxreid.official import encoder_to_official, neck_variables, split_official
from jaxreid.nn.transformer import encoder_layer_from_torch, encoder_layer_to_torch
from jaxreid.weights import (DEFAULT_INPUT_SIZE, batch_norm, count_layers, linear, some,
                             torch_batch_norm, torch_linear)

_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_ENCODER_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")



def detect(keys) -> bool:
  """TransMatcher's decoder ('matcher.decoder.*', the per-layer template 'decoder_layer.*') or
  its encoder layers ('encoder.layers.*')."""
  return (has_key(keys, "matcher.decoder") or has_key(keys, "decoder_layer.")
          or has_key(keys, "encoder.layers."))


def _transmatcher_matcher(matcher: Mapping, num_layers: int, switches: dict):
  """(params, batch_stats) of the Flax TransMatcher from the official matcher state."""
  params, stats = {}, {}
  for i in range(num_layers):
    p = f"decoder.layers.{i}."
    layer, layer_stats = {}, {}
    if switches["bn1"]:
      layer["bn1"], layer_stats["bn1"] = batch_norm(matcher, p + "bn1")
    if switches["mlp_head1"]:
      layer["fc2"] = linear(matcher, p + "fc2")
      layer["bn2"], layer_stats["bn2"] = batch_norm(matcher, p + "bn2")
    layer["fc3"] = linear(matcher, p + "fc3")
    layer["bn3"], layer_stats["bn3"] = batch_norm(matcher, p + "bn3")
    params[f"layers_{i}"], stats[f"layers_{i}"] = layer, layer_stats
  layers = [f"decoder.layers.{i}." for i in range(num_layers)]
  if switches["fc1"]:
    fc1 = [linear(matcher, p + "fc1") for p in layers]
    params["fc1_kernel"] = np.stack([f["kernel"] for f in fc1])
    params["fc1_bias"] = np.stack([f["bias"] for f in fc1])
  if switches["prior_embed"]:
    # Official score_embed [1, 1, S_gallery, S_probe] (scores are indexed q, k, s, t); ours is
    # probe location × gallery location.
    params["prior"] = np.stack([np.asarray(matcher[p + "score_embed"], np.float32)[0, 0].T
                                for p in layers])
  params["norm"], stats["norm"] = batch_norm(matcher, "decoder.norm")
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
  if not any(_DECODER_LAYER.match(k) for k in matcher):
    raise ValueError("This is not a TransMatcher checkpoint: it has no 'matcher.decoder.layers.*' "
                     "keys; pass the name of the method that wrote it.")
  if "neck_conv.weight" not in model:
    raise ValueError("The TransMatcher feature model has no 'neck_conv.weight'.")
  arch = infer_architecture(model, "base.")
  neck_params, d, neck_in = neck_variables(model)
  final_layer = layers_fitting(model, arch, neck_in)[0]
  h, w = feature_map_size(ml_collections.ConfigDict(dict(final_layer=final_layer)), *input_size)
  num_layers = count_layers(matcher, _DECODER_LAYER)
  encoders = count_layers(model, _ENCODER_LAYER)
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
    encoder[f"layers_{i}"] = encoder_layer_from_torch(model, f"encoder.layers.{i}.")
  matcher_params, matcher_stats = _transmatcher_matcher(matcher, num_layers, switches)
  unused = sorted(k for k in model
                  if not k.startswith(("base.", "neck_conv.", "neck_bn.", "encoder.layers.")))
  if unused:
    raise ValueError(f"The feature model has keys TransMatcher does not use: {some(unused)}.")
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


def transmatcher_to_official(variables: Mapping) -> dict:
  """{"model": feature model with 'encoder.layers.*', "criterion": {"matcher.decoder.*"}} as
  the official TransMatcher code saves it; the inverse of `transmatcher_from_official`."""
  encoder = variables["params"]["encoder"]
  model = encoder_to_official(variables)
  for i in range(sum(k.startswith("layers_") for k in encoder)):
    model.update(encoder_layer_to_torch(encoder[f"layers_{i}"], f"encoder.layers.{i}."))
  return {"model": model, "criterion": matcher_to_official(variables["params"]["matcher"],
                                                          variables["batch_stats"]["matcher"])}


def matcher_to_official(params: Mapping, stats: Mapping) -> dict:
  """The official matcher state ('matcher.decoder.*') of the Flax TransMatcher's variables."""
  criterion = {}
  for i in range(sum(k.startswith("layers_") for k in params)):
    p = f"matcher.decoder.layers.{i}."
    layer, layer_stats = params[f"layers_{i}"], stats[f"layers_{i}"]
    if "fc1_kernel" in params:
      criterion.update(torch_linear({"kernel": params["fc1_kernel"][i],
                                     "bias": params["fc1_bias"][i]}, p + "fc1"))
    if "prior" in params:   # ours: probe × gallery location; official [1, 1, gallery, probe]
      criterion[p + "score_embed"] = np.asarray(params["prior"][i], np.float32).T[None, None]
    for bn in ("bn1", "bn2", "bn3"):
      if bn in layer:
        criterion.update(torch_batch_norm(layer[bn], layer_stats[bn], p + bn))
    for fc in ("fc2", "fc3"):
      if fc in layer:
        criterion.update(torch_linear(layer[fc], p + fc))
  criterion.update(torch_batch_norm(params["norm"], stats["norm"], "matcher.decoder.norm"))
  return criterion
