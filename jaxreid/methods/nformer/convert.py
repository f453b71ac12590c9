"""The official NFormer release (haochenheheda/NFormer, `nformer_model.pth`) → jaxreid variables."""
import re
from collections.abc import Mapping

import numpy as np

from jaxreid.methods import has_key
from jaxreid.weights import count_layers, flatten_state, strip_prefix


def detect(keys) -> bool:
  """NFormer blocks ('h.0.attn.c_attn.*'), or a stage-1 model with a 'projection' over a
  ResNet 'base.layer*'."""
  return has_key(keys, "h.0.attn.c_attn.") or (has_key(keys, "projection.")
                                               and has_key(keys, "base.layer"))


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
  layers = count_layers(flat, re.compile(r"h\.(\d+)\.attn\.c_attn\.w$"))
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
