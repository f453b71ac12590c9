"""KPM checkpoints in PyTorch layouts ↔ jaxreid variables.

- The authors' released model (YantaoShen/kpm_rw_person_reid, `examples/main.py`): the
  `state_dict` of `RandomWalkKpmNet`: 'base.module.base.*' (torchvision ResNet-50 in a
  DataParallel), and per embed g 'embed_{g}.bn.*' (BatchNorm1d(2048 / groups)) and
  'embed_{g}.classifier.*' (Linear(2048 / groups → 2)). Their "pretrained" files keep the embed
  as 'module.embed_model.*' (one group) or 'embed_model.bn_{g}.*' / 'embed_model.classifier_{g}.*'
  (the names their main.py copies from); all three load.
- The paper's hourglass model, of which no code or weights were released, in jaxreid's own
  PyTorch layout (what `export` writes and the benchmark's PyTorch model reads): the same
  'base.module.base.*', 'hourglass.reduce_{s}.*' / 'hourglass.lateral_{s}.*' (1×1 Conv2d),
  'embed.rsa_{s}.conv{1,2,3}.*' (1×1 Conv2d) and 'embed.rsa_{s}.bn{1,2}.*', 'embed.bn_{s}.*',
  'embed.classifier.*' (Linear(Σ C_s → 1)).
"""
import re
from collections.abc import Mapping

import numpy as np

from jaxreid.backbones.resnet import (deepest_layer, infer_architecture, resnet_from_torch,
                                      resnet_to_torch)
from jaxreid.weights import (DEFAULT_INPUT_SIZE, batch_norm, conv_kernel, flatten_state, linear,
                             some, strip_prefix, torch_batch_norm, torch_conv, torch_linear)

BASE = "base.module.base."
_EMBED = re.compile(r"^embed_(\d+)\.(bn|classifier)\.")
_EMBED_MODEL = re.compile(r"^embed_model\.(bn|classifier)_(\d+)\.")
_RSA = re.compile(r"^embed\.rsa_(\d+)\.")


def detect(keys) -> bool:
  """The released 'embed_{g}.classifier.*' / 'embed_model.*' embeds, or the paper layout's
  'embed.rsa_*' / 'hourglass.*', next to a 'base.module.base.' ResNet."""
  keys = [k[len("state_dict."):] if k.startswith("state_dict.") else k for k in keys]
  if not any(k.startswith(BASE) for k in keys):
    return False
  return any(_EMBED.match(k) or _EMBED_MODEL.match(k) or k.startswith("module.embed_model.")
             or _RSA.match(k) or k.startswith("hourglass.") for k in keys)


def _state(ckpt: Mapping) -> dict:
  flat = flatten_state(ckpt)
  if any(k.startswith("state_dict.") for k in flat):
    flat = strip_prefix(flat, "state_dict.")
  return {k: v for k, v in flat.items() if isinstance(v, np.ndarray) or hasattr(v, "shape")}


def _released_embeds(state: dict) -> tuple[list[str], str]:
  """(prefix of each embed's module names, layout) of the released layouts."""
  groups = sorted({int(m.group(1)) for k in state if (m := _EMBED.match(k))})
  if groups:
    return [f"embed_{g}." for g in groups], "final"
  groups = sorted({int(m.group(2)) for k in state if (m := _EMBED_MODEL.match(k))})
  if groups:
    return [f"embed_model.{{}}_{g}" for g in groups], "pretrained"
  if any(k.startswith("module.embed_model.") for k in state):
    return ["module.embed_model."], "single"
  return [], ""


def _module_name(prefix: str, module: str) -> str:
  return prefix.format(module) if "{}" in prefix else f"{prefix}{module}"


def kpm_from_torch(ckpt: Mapping, input_size=DEFAULT_INPUT_SIZE):
  """(config overrides, variables) of a KPM checkpoint in either layout above, which warps raw
  maps (model.normalize = False). The released layout stores no input size: the authors'
  main.py trains at 384×128 (the default here). The paper layout stores no temperatures: τ_KPM
  and τ_RSA come from the config."""
  state = _state(ckpt)
  if f"{BASE}conv1.weight" not in state:
    raise ValueError(f"This is not a KPM checkpoint: it has no '{BASE}conv1.weight'.")
  arch = infer_architecture(state, BASE)
  final_layer = deepest_layer(state, BASE)
  backbone, backbone_stats = resnet_from_torch(state, BASE, final_layer)
  height, width = (int(v) for v in input_size)
  rest = {k: v for k, v in state.items() if not k.startswith(BASE)}
  embeds, layout = _released_embeds(rest)
  if embeds:
    params, stats = {}, {}
    for g, prefix in enumerate(embeds):
      params[f"bn_{g}"], stats[f"bn_{g}"] = batch_norm(rest, _module_name(prefix, "bn"))
      params[f"classifier_{g}"] = linear(rest, _module_name(prefix, "classifier"))
    used = {k for k in rest for prefix in embeds
            if k.startswith((_module_name(prefix, "bn") + ".", _module_name(prefix, "classifier")
                             + "."))}
    encoder = {"backbone": backbone}
    model = dict(variant="released", scales=1, tau=1.0, groups=len(embeds))
  elif any(_RSA.match(k) for k in rest):
    scales = len({int(m.group(1)) for k in rest if (m := _RSA.match(k))})
    encoder, params, stats = {"backbone": backbone}, {}, {}
    for s in range(1, scales):
      for name in ("reduce", "lateral"):
        key = f"hourglass.{name}_{s}"
        encoder[f"{name}_{s}"] = {"kernel": conv_kernel(rest[f"{key}.weight"]),
                                  "bias": np.asarray(rest[f"{key}.bias"], np.float32)}
    for s in range(scales):
      p = f"embed.rsa_{s}."
      dense = lambda name: np.asarray(rest[f"{p}{name}.weight"], np.float32)[:, :, 0, 0].T
      rsa, rsa_stats = {"conv1": {"kernel": dense("conv1")}, "conv2": {"kernel": dense("conv2")},
                        "conv3": {"kernel": dense("conv3"),
                                  "bias": np.asarray(rest[f"{p}conv3.bias"], np.float32)}}, {}
      for i in (1, 2):
        rsa[f"bn{i}"], rsa_stats[f"bn{i}"] = batch_norm(rest, f"{p}bn{i}")
      params[f"rsa_{s}"], stats[f"rsa_{s}"] = rsa, rsa_stats
      params[f"bn_{s}"], stats[f"bn_{s}"] = batch_norm(rest, f"embed.bn_{s}")
    params["classifier"] = linear(rest, "embed.classifier")
    used = {k for k in rest if k.startswith(("hourglass.", "embed."))}
    model = dict(variant="paper", scales=scales,
                 rsa_channels=int(np.shape(rest["embed.rsa_0.conv1.weight"])[0]))
  else:
    raise ValueError("This checkpoint has a ResNet but no KPM embed ('embed_{g}.*', "
                     "'embed_model.*' or 'embed.*').")
  unused = sorted(k for k in set(rest) - used if not k.endswith("num_batches_tracked"))
  if unused:
    raise ValueError(f"The checkpoint has keys KPM does not use: {some(unused)}.")
  variables = {"params": {"encoder": encoder, "matcher": params},
               "batch_stats": {"encoder": {"backbone": backbone_stats}, "matcher": stats}}
  overrides = {
      "model": dict(name="kpm", **arch, final_layer=final_layer, last_stride=2, neck=0,
                    input_norm="imagenet", normalize=False, **model),
      "data": dict(height=height, width=width),
  }
  return overrides, variables


def kpm_to_torch(variables) -> dict:
  """The PyTorch state dict (NumPy) of KPM variables: the authors' RandomWalkKpmNet layout for
  the released variant, jaxreid's layout above for the paper model; `kpm_from_torch`'s inverse."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  encoder, matcher = params["encoder"], params["matcher"]
  m_stats = stats.get("matcher", {})
  out = resnet_to_torch(encoder["backbone"], stats.get("encoder", {}).get("backbone", {}), BASE)
  if "classifier_0" in matcher:
    for g in range(sum(k.startswith("classifier_") for k in matcher)):
      out.update(torch_batch_norm(matcher[f"bn_{g}"], m_stats[f"bn_{g}"], f"embed_{g}.bn"))
      out.update(torch_linear(matcher[f"classifier_{g}"], f"embed_{g}.classifier"))
    return out
  for name, leaves in encoder.items():
    if name != "backbone":
      out[f"hourglass.{name}.weight"] = torch_conv(leaves["kernel"])
      out[f"hourglass.{name}.bias"] = np.asarray(leaves["bias"], np.float32)
  for s in range(sum(k.startswith("rsa_") for k in matcher)):
    rsa, p = matcher[f"rsa_{s}"], f"embed.rsa_{s}."
    for i in (1, 2, 3):
      kernel = np.asarray(rsa[f"conv{i}"]["kernel"], np.float32)
      out[f"{p}conv{i}.weight"] = kernel.T[:, :, None, None]
    out[f"{p}conv3.bias"] = np.asarray(rsa["conv3"]["bias"], np.float32)
    for i in (1, 2):
      out.update(torch_batch_norm(rsa[f"bn{i}"], m_stats[f"rsa_{s}"][f"bn{i}"], f"{p}bn{i}"))
    out.update(torch_batch_norm(matcher[f"bn_{s}"], m_stats[f"bn_{s}"], f"embed.bn_{s}"))
  out.update(torch_linear(matcher["classifier"], "embed.classifier"))
  return out
