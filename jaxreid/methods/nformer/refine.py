"""A loaded NFormer for users: `jaxreid.load("nformer", …)` → `NFormerModel.refine` (the head),
and `NFormerModel.encode` (stage 1) when the official release file holds it too."""
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxreid import models, official
from jaxreid.methods.nformer.convert import nformer_from_official
from jaxreid.methods.nformer.model import NFormer
from jaxreid.nn.norms import l2_normalize
from jaxreid.weights import check_variables, flatten_state, read_state_dict

STAGE2_DIR = "nformer"


def build_head(nf, num_classes: int | None = None) -> NFormer:
  """The NFormer module of config block `nf` (config.nformer; dim must be resolved)."""
  return NFormer(dim=int(nf.dim), heads=int(nf.heads), ffn=int(nf.ffn), layers=int(nf.layers),
                 k=int(nf.k), num_landmarks=int(nf.num_landmarks),
                 num_classes=int(nf.num_classes if num_classes is None else num_classes),
                 block=int(nf.block), dropout=float(nf.get("dropout", 0.0)))


def stage1_from_official(state, build_stage1, input_size=(256, 128)):
  """(config, stage-1 module from `build_stage1(config)`, variables) of the official `Baseline`
  in `state` (bare, or the 'backbone.*' half of the release file); see
  `official.baseline_from_official`."""
  overrides, variables = official.baseline_from_official(state, input_size)
  config = ml_collections.ConfigDict(dict(
      model=dict(backbone="resnet", **overrides["model"]), data=overrides["data"],
      train=dict(bf16=False)))
  return config, build_stage1(config), variables


def load_nformer(checkpoint, *, build_stage1, heads: int = 2,
                 input_size=(256, 128)) -> "NFormerModel":
  """The NFormer of `checkpoint`: the official release file (`nformer_model.pth`: 'backbone.*'
  the stage-1 `Baseline`, 'nformer.*' the head; layers, dim and ffn read from the shapes,
  `heads` is not in it) with `encode` (stage 1 of `build_stage1(config)`, images of
  `input_size`) and `refine`; a bare
  NFormer state dict (refine only); or a jaxreid NFormer run: its workdir, its `nformer/`
  directory or a checkpoint directory in it (refine only)."""
  path = Path(os.path.expanduser(str(checkpoint)))
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  if not path.is_dir():
    state = read_state_dict(path)
    try:
      arch, variables = nformer_from_official(state, heads=heads)
    except ValueError as e:
      if any(k.endswith("projection.weight") for k in flatten_state(state)):
        raise ValueError(f"{path} holds a stage-1 model only (no NFormer head); load it with "
                         "jaxreid.load('embedding', …).") from e
      raise
    stage1 = None
    try:
      stage1 = stage1_from_official(state, build_stage1, input_size)
    except ValueError as e:
      if "no reid-strong-baseline stage-1 model" not in str(e):
        raise
    return NFormerModel(ml_collections.ConfigDict(dict(k=20, num_landmarks=5, block=2048,
                                                       landmark_seed=0, **arch)), variables,
                        stage1=stage1)
  from jaxreid.checkpoint import restore_for_eval   # Orbax only when a run is loaded
  if (path / STAGE2_DIR).is_dir():
    path = path / STAGE2_DIR
  saved, variables = restore_for_eval(str(path))
  if "nformer" not in saved:
    raise ValueError(f"{path} is a checkpoint of '{saved.model.name}', not of NFormer stage 2; "
                     "pass an NFormer run's workdir or its nformer/ directory.")
  return NFormerModel(saved.nformer, variables)


class NFormerModel:
  """A loaded NFormer: `refine(features [N, dim])` → post-BN refined vectors [N, dim]; with a
  stage-1 model (the official release file), `encode(images)` → its eval-mode post-BN vectors.

  Attributes: `config` (the nformer settings: layers, dim, ffn, heads, k, num_landmarks, …),
  `variables`, `module` (NFormer without its classifier), `stage1` ((config, module, variables)
  of the stage-1 model, or None)."""

  def __init__(self, nf_config, variables, stage1=None):
    self.config = nf_config
    self.stage1 = stage1
    if stage1 is not None:
      s1_config, s1_module, s1_vars = stage1
      size = (int(s1_config.data.height), int(s1_config.data.width))
      expected = jax.eval_shape(lambda: models.init_variables(s1_module, jax.random.key(0), *size))
      check_variables(expected, s1_vars, "The stage-1 model of the checkpoint")
      self.stage1 = (s1_config, s1_module, jax.device_put(s1_vars))
      self.input_size = size
      self._encode = jax.jit(lambda v, x: s1_module.apply(v, x, method="encode"))
    self.module = build_head(nf_config, 0)
    self.variables = jax.device_put({
        "params": {k: v for k, v in variables["params"].items() if k != "classifier"},
        "batch_stats": variables["batch_stats"]})
    n = max(self.module.k, self.module.num_landmarks)
    expected = jax.eval_shape(lambda: self.module.init(
        jax.random.key(0), np.zeros((n, self.module.dim), np.float32), jax.random.key(0)))
    check_variables(expected, self.variables, "The NFormer checkpoint")

  def __repr__(self):
    m = self.module
    return (f"NFormerModel(layers={m.layers}, dim={m.dim}, heads={m.heads}, ffn={m.ffn}, "
            f"k={m.k}, landmarks={m.num_landmarks})")

  def encode(self, images, batch_size: int = 64) -> np.ndarray:
    """Stage-1 features [B, dim] (eval mode, post-BN: the official TEST.NECK_FEAT "after") of
    NHWC RGB images of `input_size`, uint8 or float in [0, 1]; ImageNet-normalised inside."""
    if self.stage1 is None:
      raise ValueError("this NFormer checkpoint holds no stage-1 model; encode with "
                       "jaxreid.load('embedding', <stage-1 run or file>).")
    images = np.asarray(images)
    h, w = self.input_size
    if images.ndim != 4 or images.shape[1:] != (h, w, 3):
      raise ValueError(f"expected NHWC RGB images [B, {h}, {w}, 3]; got shape {images.shape}.")
    _, _, variables = self.stage1
    return np.concatenate([np.asarray(self._encode(variables, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])

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
