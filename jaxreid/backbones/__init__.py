"""Backbones chosen by `model.backbone`: each maps normalised pixels to a feature map
[B, h, w, C] and brings its own output size, ImageNet-weight loader and a few words about
itself.

A backbone module is always built as the submodule `backbone` of the encoder, so its
parameters sit under params/encoder/backbone: the optimiser's backbone lr group
(`train.backbone_lr_mult`) and `model.pretrained` both address that subtree.
"""
from typing import Any, Callable, NamedTuple

from jaxreid.backbones import resnet, vit


class Backbone(NamedTuple):
  build: Callable[[Any, Any], Any]                    # (model config, dtype) → Flax module
  output_size: Callable[[Any, int, int], tuple]       # (model config, H, W) → (h, w)
  load_pretrained: Callable[[str, Any], tuple]        # (path, model config) → (params, stats)
  describe: Callable[[Any], str]                      # model config → "ResNet-50 ibn=b, layer3"


BACKBONES = {
    "resnet": Backbone(resnet.from_config, resnet.output_size, resnet.load_pretrained,
                       resnet.describe),
    "vit": Backbone(vit.from_config, vit.output_size, vit.load_pretrained, vit.describe),
}


def get(model_cfg) -> Backbone:
  """The backbone of `model.backbone` (default "resnet": configs saved before the field)."""
  name = model_cfg.get("backbone", "resnet")
  if name not in BACKBONES:
    raise ValueError(f"model.backbone={name!r} is unknown; use one of {sorted(BACKBONES)}.")
  return BACKBONES[name]
