"""Public API: `load(method_or_config, checkpoint) → ReidModel`.

    model = jaxreid.load("qaconv", "checkpoint.pth.tar")       # official QAConv weights
    model = jaxreid.load("qaconv_gs", "runs/market")            # a jaxreid training run
    maps = model.encode(images)                                 # [B, h, w, d]
    scores = model.match(maps[:10], maps)                       # [10, B] logits
    ranked = model.ranking_scores(maps[:10], maps)              # as evaluation ranks them
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

from jaxreid import backbones, registry
from jaxreid.eval.scoring import match_fn, score_matrix
from jaxreid.models import feature_map_size, init_variables
from jaxreid.weights import DEFAULT_INPUT_SIZE, check_variables, read_state_dict


def configs_dir() -> Path:
  """The repository's `configs/` directory (next to the `jaxreid` package)."""
  return Path(__file__).resolve().parent.parent / "configs"


def config_names() -> list[str]:
  """The configs shipped in `configs/`, by name ("qaconv_gs", "vit", …): a method's default
  config is named after it, and some configs run another method's model."""
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


def load_config_module(path):
  """The module of an ml_collections config file (it defines `get_config`)."""
  path = Path(os.path.expanduser(str(path)))
  if not path.is_file():
    raise FileNotFoundError(f"Config file {path} does not exist.")
  _import_configs_package()
  spec = importlib.util.spec_from_file_location(f"_jaxreid_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"Config file {path} has no get_config() function.")
  return module


def load_config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` (or `get_config()`) of an ml_collections config file."""
  module = load_config_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def resolve_config(method_or_config) -> ml_collections.ConfigDict:
  """A ConfigDict from a shipped config's name ("qaconv_gs", see `config_names`), a
  'file.py[:arg]' path or a ConfigDict."""
  if isinstance(method_or_config, ml_collections.ConfigDict):
    return ml_collections.ConfigDict(method_or_config.to_dict())
  spec = str(method_or_config)
  path, sep, arg = spec.rpartition(":")
  if not (sep and path.endswith(".py")):
    path, arg = spec, None
  if path.endswith(".py"):
    return load_config_file(path, arg)
  if spec in config_names():
    return load_config_file(configs_dir() / f"{spec}.py")
  raise ValueError(f"Unknown method {spec!r}: use one of {config_names()} or a config file "
                   "path 'file.py[:setting]'.")


def _apply(config: ml_collections.ConfigDict, model: dict, height: int, width: int):
  with config.unlocked():
    config.model.update(model)
    config.data.height, config.data.width = int(height), int(width)
  return config


def _load_official(path: Path, config, method, input_size):
  """(config, variables) from an official .pth/.pth.tar/.safetensors checkpoint of `method`."""
  state = read_state_dict(path)
  requested = method.name
  found = registry.detect(state)
  if found is not None and found != requested:
    raise ValueError(f"{path} looks like a {found} checkpoint, but method '{requested}' was "
                     f"requested; pass '{found}' instead.")
  convert = method.convert
  if convert is None:
    supported = sorted(name for name, m in registry.METHODS.items() if m.convert is not None)
    raise ValueError(f"Official checkpoints of '{requested}' cannot be converted yet (supported: "
                     f"{supported}).")
  try:
    overrides, variables = convert(state, input_size)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return _apply(config, overrides["model"], **overrides["data"]), variables


def _load_ours(path: Path, config, from_method_name: bool, requested: str):
  """(config, variables) from a jaxreid (Orbax) checkpoint directory."""
  from jaxreid import checkpoint  # Orbax is imported only when needed
  saved, variables = checkpoint.restore_for_eval(str(path))
  if saved.model.name != config.model.name:
    held = saved.get("method") or saved.model.name
    asked = (f"'{requested}' (model {config.model.name})" if requested != config.model.name
             else f"'{requested}'")
    raise ValueError(f"{path} holds a {held} run, but {asked} was asked for; load it with "
                     f"jaxreid.load('{held}', …) or --config {held}.")
  if from_method_name:
    return saved, variables
  return _apply(config, saved.model.to_dict(), saved.data.height, saved.data.width), variables


def load(method_or_config, checkpoint, *, input_size=None, batch_size: int | None = None):
  """A ReidModel with the weights of `checkpoint` (or the method's own loaded object, for a
  method with a `load`).

  `method_or_config`: a method or shipped config name ("qaconv", "qaconv_gs"), a config file
  'file.py[:setting]', or a ConfigDict. `checkpoint`: an official .pth.tar/.pth/.safetensors
  file of the method (the architecture is read from it; input `input_size`, default the
  method's `input_size` or 384×128), or a jaxreid run / Orbax checkpoint directory
  (architecture and input size from its saved config). `batch_size`: images per `encode` step
  (default `config.eval.batch_size`).
  """
  if isinstance(method_or_config, str) and method_or_config in registry.METHODS:
    pipeline = registry.get(method_or_config)
    if pipeline.load is not None:   # its own loaded object (a stage on another method's model)
      return pipeline.load(checkpoint, **({"input_size": tuple(input_size)} if input_size else {}))
  config = resolve_config(method_or_config)
  method = registry.get(config.model.name)     # the method of the image model
  path = Path(os.path.expanduser(str(checkpoint)))
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  if path.is_dir():
    is_name = isinstance(method_or_config, str) and method_or_config in config_names()
    requested = (method_or_config if isinstance(method_or_config, str)
                 else config.model.name)
    config, variables = _load_ours(path, config, is_name, requested)
  else:
    config, variables = _load_official(path, config, method, tuple(
        input_size or method.input_size or DEFAULT_INPUT_SIZE))
  return ReidModel(config, variables, method=method, batch_size=batch_size)


class ReidModel:
  """A loaded image model: `encode` images → features (maps, or vectors of an embedding model),
  `match` features → scores [P, G] (higher = more similar).

  Attributes: `config` (ConfigDict), `variables` ({"params", "batch_stats"}), `method` (its
  `registry` entry, of config.model.name unless given), `module` (the Flax model), `input_size`
  (h, w) and `map_size` (h, w) of the backbone's feature maps.
  """

  def __init__(self, config, variables, *, method=None, batch_size: int | None = None):
    self.config = config
    self.method = method or registry.get(config.model.name)
    self.module = self.method.build(config)
    self.input_size = (int(config.data.height), int(config.data.width))
    self.map_size = feature_map_size(config.model, *self.input_size)
    self.batch_size = int(batch_size or config.get("eval", {}).get("batch_size", 64))
    expected = jax.eval_shape(lambda: init_variables(self.module, jax.random.key(0),
                                                     *self.input_size))
    check_variables(expected, variables)
    self.variables = jax.device_put(variables)
    module = self.module
    self._encode = jax.jit(lambda v, x: module.apply(v, x, method="encode"))
    self._match_fn = match_fn(module)  # shared with evaluation: one jit cache per model
    # What encode() gives per image: maps [h, w, d], stacked maps [L, h, w, d], or vectors [D].
    self.feature_shape = tuple(jax.eval_shape(
        self._encode, self.variables,
        jax.ShapeDtypeStruct((1, *self.input_size, 3), np.uint8)).shape[1:])

  def __repr__(self):
    m = self.config.model
    return "ReidModel(" + ", ".join(filter(None, [
        m.name, backbones.get(m).describe(m), self.method.describe(m),
        f"input {self.input_size[0]}×{self.input_size[1]}",
        f"features {self.feature_shape}"])) + ")"

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
    if images.dtype != np.uint8 and np.isnan(images).any():
      raise ValueError(f"images contain NaN ({int(np.isnan(images).sum())} values); pass uint8 "
                       "or finite floats in [0, 1].")
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
    """`maps` as an array, or one sentence when they are not this model's features (another
    shape, channels included) or hold NaN or infinite values."""
    maps = np.asarray(maps)
    if maps.shape[1:] != self.feature_shape:
      raise ValueError(f"{name} must be this model's features [N, "
                       f"{', '.join(map(str, self.feature_shape))}] from encode(); got shape "
                       f"{maps.shape}.")
    finite = np.isfinite(maps if maps.dtype.kind == "f" else maps.astype(np.float32))
    if not finite.all():
      raise ValueError(f"{name} hold {finite.size - int(finite.sum())} NaN or infinite values; "
                       "pass the finite features encode() gives.")
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

  def ranking_scores(self, probe_maps, gallery_maps, *, rerank: bool = False) -> np.ndarray:
    """What evaluation ranks by [P, G] (higher = better; `evaluator.ranking_scores`): `match`,
    or with config.eval.rescore_top_k each probe's top k of the pooled features' Euclidean
    ranking re-scored (with eval.random_walk_alpha, KPM's random walk: the authors' released
    evaluation, distance sigmoid(−score)); with `rerank`, −(k-reciprocal re-ranked distance)."""
    from jaxreid.eval.evaluator import ranking_scores
    return ranking_scores(self.config, self.module, self.variables,
                          self._check_maps(probe_maps, "probe_maps"),
                          self._check_maps(gallery_maps, "gallery_maps"), rerank=rerank)

  def correspondences(self, probe_maps, gallery_maps) -> dict:
    """Argmax matches for drawing: for every pair and matching layer, each probe location's best
    gallery location and vice versa (flat y*w+x), with their similarities. Arrays
    [L, P, G, h*w] with a leading axis over the method's matching layers. Keys: probe_to_gallery, probe_to_gallery_score, gallery_to_probe,
    gallery_to_probe_score. Meant for a few pairs at a time (memory P·G·L·(h*w)²)."""
    if self.method.correspondences is None:
      drawable = sorted(n for n, m in registry.METHODS.items() if m.correspondences is not None)
      raise ValueError(f"{self.config.model.name} has no local correspondences to draw (its "
                       f"scores are not a max over location pairs); use one of {drawable}.")
    probe = self._check_maps(probe_maps, "probe_maps")
    gallery = self._check_maps(gallery_maps, "gallery_maps")
    return self.method.correspondences(self.variables, probe, gallery)

  def score(self, probe_images, gallery_images, **kwargs) -> np.ndarray:
    """`match(encode(probe_images), encode(gallery_images))`."""
    return self.match(self.encode(probe_images), self.encode(gallery_images), **kwargs)


def evaluate_checkpoint(config, checkpoint: str, workdir: str | None = None) -> dict:
  """Evaluates a checkpoint (a run's workdir/checkpoint dir, or an official file) on the test
  sets of `config`; the architecture comes from the checkpoint. With a workdir, writes
  workdir/results.json and workdir/retrieval.npz."""
  from jaxreid import parallel
  from jaxreid.eval.evaluator import evaluate_matcher, write_results
  from jaxreid.train import preflight
  preflight.validate_eval(config)
  loaded = load(config, checkpoint)
  eval_config = config.copy_and_resolve_references()
  with eval_config.unlocked():
    eval_config.model = loaded.config.model
    eval_config.data.height, eval_config.data.width = loaded.input_size
  mesh = parallel.make_mesh()
  results = evaluate_matcher(eval_config, loaded.module, loaded.variables, mesh, workdir=workdir)
  results["checkpoint"] = str(checkpoint)
  if workdir is not None:
    write_results(workdir, results)
  return results


def convert(method_or_config, checkpoint, out_dir, *, input_size=None) -> dict:
  """`checkpoint` (an official .pth/.pth.tar/.safetensors file, or any checkpoint `load`
  reads) → a jaxreid checkpoint folder `out_dir` (out_dir/best/0: variables and config) that
  `load` and --mode=eval read without torch. Returns {"path", "method", "input_size"}."""
  from jaxreid.checkpoint import save_for_eval
  model = load(method_or_config, checkpoint, input_size=input_size)
  if not isinstance(model, ReidModel):
    raise ValueError(f"{checkpoint} loads as a {type(model).__name__}, which --mode=convert "
                     "cannot write; convert the image model's checkpoint instead.")
  path = save_for_eval(out_dir, model.config, model.variables)
  return {"path": str(path), "method": model.config.model.name,
          "input_size": list(model.input_size)}
