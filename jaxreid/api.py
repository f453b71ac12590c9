"""Public API: `load(method_or_config, checkpoint) → ReidModel`.

    model = jaxreid.load("qaconv", "checkpoint.pth.tar")       # official QAConv weights
    model = jaxreid.load("qaconv_gs", "runs/market")            # a jaxreid training run
    maps = model.encode(images)                                 # [B, h, w, d]
    scores = model.match(maps[:10], maps)                       # [10, B] logits
    nformer = jaxreid.load("nformer", "nformer_model.pth")      # NFormer stage 2 (or a run)
    refined = nformer.refine(features, num_queries=len(query))  # post-BN refined vectors
"""
import importlib.util
import os
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxreid import convert
from jaxreid.eval.scoring import score_matrix
from jaxreid.evaluate import match_fn
from jaxreid.models import (build_model, feature_map_size, init_variables, is_embedding,
                            l2_normalize)

CONVERTERS = {"qaconv": convert.qaconv_from_official,  # model.name → official converter
              "transmatcher": convert.transmatcher_from_official}


def configs_dir() -> Path:
  """The repository's `configs/` directory (next to the `jaxreid` package)."""
  return Path(__file__).resolve().parent.parent / "configs"


def method_names() -> list[str]:
  """Methods with a config file in `configs/`."""
  return sorted(p.stem for p in configs_dir().glob("*.py")
                if p.stem not in ("__init__", "common"))


def _import_configs_package() -> None:
  """Makes `import configs` (used by the config files) find the repository's `configs/`."""
  if "configs" in sys.modules:
    return
  init = configs_dir() / "__init__.py"
  spec = importlib.util.spec_from_file_location("configs", init,
                                                submodule_search_locations=[str(init.parent)])
  module = importlib.util.module_from_spec(spec)
  sys.modules["configs"] = module
  spec.loader.exec_module(module)


def load_config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` (or `get_config()`) of an ml_collections config file."""
  path = Path(os.path.expanduser(str(path)))
  if not path.is_file():
    raise FileNotFoundError(f"Config file {path} does not exist.")
  _import_configs_package()
  spec = importlib.util.spec_from_file_location(f"_jaxreid_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path} has no get_config() function.")
  return module.get_config() if arg is None else module.get_config(arg)


def resolve_config(method_or_config) -> ml_collections.ConfigDict:
  """A ConfigDict from a method name ("qaconv_gs"), a 'file.py[:arg]' path or a ConfigDict."""
  if isinstance(method_or_config, ml_collections.ConfigDict):
    return ml_collections.ConfigDict(method_or_config.to_dict())
  spec = str(method_or_config)
  path, sep, arg = spec.rpartition(":")
  if not (sep and path.endswith(".py")):
    path, arg = spec, None
  if path.endswith(".py"):
    return load_config_file(path, arg)
  if spec in method_names():
    return load_config_file(configs_dir() / f"{spec}.py")
  raise ValueError(f"Unknown method {spec!r}: use one of {method_names()} or a config file "
                   "path 'file.py[:setting]'.")


def _apply(config: ml_collections.ConfigDict, model: dict, height: int, width: int):
  with config.unlocked():
    config.model.update(model)
    config.data.height, config.data.width = int(height), int(width)
  return config


def _load_official(path: Path, config, input_size):
  """(config, variables) from an official .pth/.pth.tar/.safetensors checkpoint."""
  state = convert.read_state_dict(path)
  requested = config.model.name
  found = convert.detect_method(state)
  if found is not None and found != requested:
    raise ValueError(f"{path} looks like a {found} checkpoint, but method '{requested}' was "
                     f"requested; pass '{found}' instead.")
  if requested not in CONVERTERS:
    raise ValueError(f"Official checkpoints of '{requested}' cannot be converted yet (supported: "
                     f"{sorted(CONVERTERS)}).")
  try:
    overrides, variables = CONVERTERS[requested](state, input_size)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return _apply(config, overrides["model"], **overrides["data"]), variables


def _load_ours(path: Path, config, from_method_name: bool):
  """(config, variables) from a jaxreid (Orbax) checkpoint directory."""
  from jaxreid import checkpoint  # Orbax is imported only when needed
  saved, variables = checkpoint.restore_for_eval(str(path))
  if saved.model.name != config.model.name:
    raise ValueError(f"{path} is a checkpoint of method '{saved.model.name}', but "
                     f"'{config.model.name}' was requested; pass '{saved.model.name}' instead.")
  if from_method_name:
    return saved, variables
  return _apply(config, saved.model.to_dict(), saved.data.height, saved.data.width), variables


def load(method_or_config, checkpoint, *, input_size=None, batch_size: int | None = None):
  """A ReidModel with the weights of `checkpoint`.

  `method_or_config`: a method name ("qaconv", "qaconv_gs"), a config file 'file.py[:setting]',
  or a ConfigDict. `checkpoint`: an official QAConv .pth.tar/.pth/.safetensors file (the
  architecture is read from it; input `input_size`, default 384×128), or a jaxreid run / Orbax
  checkpoint directory (architecture and input size from its saved config). `batch_size`: images
  per `encode` step (default `config.eval.batch_size`).
  """
  if isinstance(method_or_config, str) and method_or_config == "nformer":
    return load_nformer(checkpoint)
  config = resolve_config(method_or_config)
  path = Path(os.path.expanduser(str(checkpoint)))
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  if path.is_dir():
    is_name = isinstance(method_or_config, str) and method_or_config in method_names()
    config, variables = _load_ours(path, config, is_name)
  else:
    config, variables = _load_official(path, config, tuple(input_size or
                                                           convert.DEFAULT_INPUT_SIZE))
  return ReidModel(config, variables, batch_size=batch_size)


class ReidModel:
  """A loaded pairwise matcher: `encode` images → feature maps, `match` maps → logits [P, G].

  Attributes: `config` (ConfigDict), `variables` ({"params", "batch_stats"}), `module` (the Flax
  PairwiseModel), `input_size` (h, w) and `map_size` (h, w) of the feature maps.
  """

  def __init__(self, config, variables, *, batch_size: int | None = None):
    self.config = config
    self.module = build_model(config)
    self.input_size = (int(config.data.height), int(config.data.width))
    self.map_size = feature_map_size(config.model, *self.input_size)
    self.batch_size = int(batch_size or config.get("eval", {}).get("batch_size", 64))
    expected = jax.eval_shape(lambda: init_variables(self.module, jax.random.key(0),
                                                     *self.input_size))
    convert.check_variables(expected, variables)
    self.variables = jax.device_put(variables)
    module = self.module
    self._encode = jax.jit(lambda v, x: module.apply(v, x, method="encode"))
    self._match_fn = match_fn(module)  # shared with evaluation: one jit cache per model

  def __repr__(self):
    m = self.config.model
    head = f", head={m.head}" if m.name == "qaconv" else ""
    output = (f"pooling {m.get('pooling', 'gap')}, vectors" if is_embedding(m)
              else f"maps {self.map_size}")
    return (f"ReidModel({m.name}, ResNet-{m.depth} ibn={m.ibn}, {m.final_layer}{head}, "
            f"input {self.input_size[0]}×{self.input_size[1]}, {output})")

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    h, w = self.input_size
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images [B, {h}, {w}, 3]; got shape {images.shape}.")
    if images.shape[1:3] != (h, w):
      raise ValueError(f"expected images of {h}×{w}, got {images.shape[1]}×{images.shape[2]}; "
                       f"resize to {h}×{w} (bicubic) first.")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images must be uint8 or float in [0, 1]; got dtype {images.dtype}.")
    if images.dtype != np.uint8 and images.size and (images.max() > 1.001 or images.min() < -1e-3):
      raise ValueError(f"float images must lie in [0, 1]; got values in [{images.min():g}, "
                       f"{images.max():g}] (pass uint8 or divide by 255).")
    return images

  def encode(self, images) -> np.ndarray:
    """Feature maps [B, h, w, d] (L2-normalised per location) of NHWC uint8 / [0, 1] images."""
    images = self._check_images(images)
    n, size = len(images), self.batch_size
    if n <= size:
      return np.asarray(self._encode(self.variables, images))
    outputs = []
    for start in range(0, n, size):  # every step has the same shape: the last one is padded
      chunk = images[start:start + size]
      pad = size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      outputs.append((self._encode(self.variables, chunk), len(chunk) - pad))
    return np.concatenate([np.asarray(maps)[:valid] for maps, valid in outputs])

  def _check_maps(self, maps, name: str) -> np.ndarray:
    maps = np.asarray(maps)
    if is_embedding(self.config.model):  # vectors [N, D]
      if maps.ndim != 2:
        raise ValueError(f"{name} must be embedding vectors [N, D] from encode(); got shape "
                         f"{maps.shape}.")
      return maps
    # TransMatcher [B, N layers, h, w, d]; Transformer-Cross [B, 2 (neck, memory), h, w, d].
    ndim = 5 if self.config.model.name in ("transmatcher", "transformer_cross") else 4
    if maps.ndim != ndim or maps.shape[-3:-1] != tuple(self.map_size):
      raise ValueError(f"{name} must be feature maps [N, {'L, ' * (ndim == 5)}"
                       f"{self.map_size[0]}, {self.map_size[1]}, d] from encode(); got shape "
                       f"{maps.shape}.")
    return maps

  def match(self, probe_maps, gallery_maps, *, tile_p: int | None = None,
            tile_g: int | None = None, progress: bool = False) -> np.ndarray:
    """Pair logits [P, G] (higher = more similar) of probe × gallery feature maps."""
    ev = self.config.get("eval", {})
    return score_matrix(self._match_fn, self.variables,
                        self._check_maps(probe_maps, "probe_maps"),
                        self._check_maps(gallery_maps, "gallery_maps"),
                        tile_p=tile_p or ev.get("tile_p", 64),
                        tile_g=tile_g or ev.get("tile_g", 256), progress=progress)

  def correspondences(self, probe_maps, gallery_maps) -> dict:
    """Argmax matches for drawing: for every pair and matching layer, each probe location's best
    gallery location and vice versa (flat y*w+x), with their similarities. Arrays
    [L, P, G, h*w] with a leading layer axis: L = 1 for QAConv
    (`jaxreid.matchers.qaconv.correspondences`), one entry per decoder layer for TransMatcher
    (`jaxreid.matchers.transmatcher.correspondences`: fc1 and the sigmoid(R_n) prior applied as
    in the decoder). Keys: probe_to_gallery, probe_to_gallery_score, gallery_to_probe,
    gallery_to_probe_score. Meant for a few pairs at a time (memory P·G·L·(h*w)²)."""
    if self.config.model.name not in ("qaconv", "transmatcher"):
      raise ValueError(f"{self.config.model.name} has no local correspondences to draw (its "
                       "scores are not a max over location pairs); use QAConv or TransMatcher.")
    probe = self._check_maps(probe_maps, "probe_maps")
    gallery = self._check_maps(gallery_maps, "gallery_maps")
    if self.config.model.name == "transmatcher":
      from jaxreid.matchers import transmatcher
      params = self.variables["params"]["matcher"]
      out = transmatcher.correspondences(probe, gallery, params.get("fc1_kernel"),
                                         params.get("fc1_bias"), params.get("prior"))
      return {k: np.asarray(v) for k, v in out.items()}
    from jaxreid.matchers.qaconv import correspondences
    out = correspondences(probe, gallery)
    return {k: np.asarray(v)[None] for k, v in out.items()}

  def score(self, probe_images, gallery_images, **kwargs) -> np.ndarray:
    """`match(encode(probe_images), encode(gallery_images))`."""
    return self.match(self.encode(probe_images), self.encode(gallery_images), **kwargs)


def load_nformer(checkpoint, *, heads: int = 2) -> "NFormerModel":
  """The NFormer head (stage 2) of `checkpoint`: the official bare state dict
  (`nformer_model.pth`; layers, dim and ffn read from the shapes, `heads` is not in it), or a
  jaxreid NFormer run: its workdir, its `nformer/` directory or a checkpoint directory in it."""
  from jaxreid.nformer_train import STAGE2_DIR
  path = Path(os.path.expanduser(str(checkpoint)))
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  if not path.is_dir():
    arch, variables = convert.nformer_from_official(convert.read_state_dict(path), heads=heads)
    return NFormerModel(ml_collections.ConfigDict(dict(k=20, num_landmarks=5, block=2048,
                                                       landmark_seed=0, **arch)), variables)
  from jaxreid import checkpoint as ckpt
  if (path / STAGE2_DIR).is_dir():
    path = path / STAGE2_DIR
  saved, variables = ckpt.restore_for_eval(str(path))
  if "nformer" not in saved:
    raise ValueError(f"{path} is a checkpoint of '{saved.model.name}', not of NFormer stage 2; "
                     "pass an NFormer run's workdir or its nformer/ directory.")
  return NFormerModel(saved.nformer, variables)


class NFormerModel:
  """A loaded NFormer head: `refine(features [N, dim])` → post-BN refined vectors [N, dim].

  Attributes: `config` (the nformer settings: layers, dim, ffn, heads, k, num_landmarks, …),
  `variables`, `module` (NFormer without its classifier)."""

  def __init__(self, nf_config, variables):
    from jaxreid.nformer_train import build_head
    self.config = nf_config
    self.module = build_head(nf_config, 0)
    self.variables = jax.device_put({
        "params": {k: v for k, v in variables["params"].items() if k != "classifier"},
        "batch_stats": variables["batch_stats"]})
    n = max(self.module.k, self.module.num_landmarks)
    expected = jax.eval_shape(lambda: self.module.init(
        jax.random.key(0), np.zeros((n, self.module.dim), np.float32), jax.random.key(0)))
    convert.check_variables(expected, self.variables, "The NFormer checkpoint")

  def __repr__(self):
    m = self.module
    return (f"NFormerModel(layers={m.layers}, dim={m.dim}, heads={m.heads}, ffn={m.ffn}, "
            f"k={m.k}, landmarks={m.num_landmarks})")

  def refine(self, features, num_landmarks: int | None = None, num_queries: int | None = None,
             *, landmark_seed: int | None = None, normalize: bool = True) -> np.ndarray:
    """Post-BN NFormer outputs of the set `features` [N, dim] (L2-normalised first unless
    `normalize=False`). With `num_queries`, the first rows are queries that attend to no other
    query (paper); without, the whole set interacts (official code). Landmarks come from a fixed
    key (`landmark_seed`, default the config's), so repeated calls agree."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != self.module.dim:
      raise ValueError(f"features must be [N, {self.module.dim}]; got shape {features.shape}.")
    module = self.module
    if num_landmarks is not None:
      module = module.clone(num_landmarks=int(num_landmarks))
    seed = self.config.get("landmark_seed", 0) if landmark_seed is None else landmark_seed
    x = l2_normalize(features) if normalize else features
    _, post, _ = module.apply(self.variables, x, jax.random.key(int(seed)),
                              num_queries=int(num_queries or 0))
    return np.asarray(post)
