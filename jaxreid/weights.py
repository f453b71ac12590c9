"""Reading PyTorch / safetensors checkpoints into NumPy, and the torch → Flax conversions every
converter shares (conv kernels, Linear, BatchNorm, layer counting, checking a converted tree).

`read_state_dict` reads a `.pth`/`.pth.tar`/`.pt` file (torch imported here only,
`weights_only=True`) or a `.safetensors` file (no torch). Each backbone and each method converts
its own official layout with these (`backbones.resnet.resnet_from_torch`,
`methods.<name>.convert`).
"""
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

TORCH_SUFFIXES = (".pth.tar", ".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
DEFAULT_INPUT_SIZE = (384, 128)   # the official QAConv / TransMatcher input
BN_EPS = 1e-5                     # torch BatchNorm default


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


def _torch_reason(error: Exception) -> str:
  """What torch.load found wrong, without its advice to load with weights_only=False (which
  would run code from the file)."""
  text = str(error)
  found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
  if found:
    return f"it holds a Python object ({found.group(1)}), not only tensors"
  if "zip archive" in text or "central directory" in text:
    return "the file is truncated or corrupted"
  if isinstance(error, (KeyError, EOFError)) or "weights_only" in text or len(text) < 20:
    return "it is not a PyTorch checkpoint of tensors"
  return text.strip().splitlines()[0]


def _read_torch(path: Path) -> dict[str, Any]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path} needs PyTorch: pip install torch (or convert the file to "
                      ".safetensors, which needs no torch).") from e
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
    raise ValueError(f"{path} could not be read as a PyTorch state dict: {_torch_reason(e)}; "
                     "jaxreid reads only tensors (weights_only), so re-save the weights as a "
                     "plain state dict or .safetensors, or check that the file is whole.") from None
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
# torch modules → Flax leaves


def conv_kernel(w) -> np.ndarray:
  """torch OIHW → Flax HWIO."""
  return np.transpose(np.asarray(w, np.float32), (2, 3, 1, 0))


def linear(state: Mapping, name: str) -> dict:
  """{kernel (in, out), bias} of a torch Linear `name`."""
  return {"kernel": np.asarray(state[f"{name}.weight"], np.float32).T,
          "bias": np.asarray(state[f"{name}.bias"], np.float32)}


def batch_norm(state: Mapping, name: str):
  """({scale, bias}, {mean, var}) of a torch BatchNorm1d(C), C ≥ 1."""
  get = lambda leaf: np.asarray(state[f"{name}.{leaf}"], np.float32).reshape(-1)
  return ({"scale": get("weight"), "bias": get("bias")},
          {"mean": get("running_mean"), "var": get("running_var")})


def count_layers(keys, pattern) -> int:
  found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
  if found and found != set(range(max(found) + 1)):
    raise ValueError(f"Layer indices {sorted(found)} are not consecutive from 0.")
  return len(found)


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
  problems = [f"{label}: {some(items)}" for label, items in
              (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
  if problems:
    raise ValueError(f"{what} does not fit the model; " + "; ".join(problems) + ".")


def some(items, n: int = 6) -> str:
  items = list(items)
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------------------------
# Flax leaves → torch modules (exporting to the official layouts)


def torch_conv(kernel) -> np.ndarray:
  """Flax HWIO → torch OIHW."""
  return np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1))


def torch_linear(params: Mapping, name: str) -> dict:
  """{name.weight (out, in), name.bias} of a Flax Dense's params."""
  out = {f"{name}.weight": np.asarray(params["kernel"], np.float32).T}
  if "bias" in params:
    out[f"{name}.bias"] = np.asarray(params["bias"], np.float32)
  return out


def torch_batch_norm(params: Mapping, stats: Mapping, name: str) -> dict:
  """{name.weight, .bias, .running_mean, .running_var} of a BatchNorm's params and stats."""
  return {f"{name}.weight": np.asarray(params["scale"], np.float32),
          f"{name}.bias": np.asarray(params["bias"], np.float32),
          f"{name}.running_mean": np.asarray(stats["mean"], np.float32),
          f"{name}.running_var": np.asarray(stats["var"], np.float32)}
