"""A loaded NFormer head for users: `jaxreid.load("nformer", …)` → `NFormerModel.refine`."""
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxreid.methods.nformer.convert import nformer_from_official
from jaxreid.methods.nformer.model import NFormer
from jaxreid.nn.norms import l2_normalize
from jaxreid.weights import check_variables, read_state_dict

STAGE2_DIR = "nformer"


def build_head(nf, num_classes: int | None = None) -> NFormer:
  """The NFormer module of config block `nf` (config.nformer; dim must be resolved)."""
  return NFormer(dim=int(nf.dim), heads=int(nf.heads), ffn=int(nf.ffn), layers=int(nf.layers),
                 k=int(nf.k), num_landmarks=int(nf.num_landmarks),
                 num_classes=int(nf.num_classes if num_classes is None else num_classes),
                 block=int(nf.block))


def load_nformer(checkpoint, *, heads: int = 2) -> "NFormerModel":
  """The NFormer head (stage 2) of `checkpoint`: the official bare state dict
  (`nformer_model.pth`; layers, dim and ffn read from the shapes, `heads` is not in it), or a
  jaxreid NFormer run: its workdir, its `nformer/` directory or a checkpoint directory in it."""
  path = Path(os.path.expanduser(str(checkpoint)))
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  if not path.is_dir():
    arch, variables = nformer_from_official(read_state_dict(path), heads=heads)
    return NFormerModel(ml_collections.ConfigDict(dict(k=20, num_landmarks=5, block=2048,
                                                       landmark_seed=0, **arch)), variables)
  from jaxreid.checkpoint import restore_for_eval   # Orbax only when a run is loaded
  if (path / STAGE2_DIR).is_dir():
    path = path / STAGE2_DIR
  saved, variables = restore_for_eval(str(path))
  if "nformer" not in saved:
    raise ValueError(f"{path} is a checkpoint of '{saved.model.name}', not of NFormer stage 2; "
                     "pass an NFormer run's workdir or its nformer/ directory.")
  return NFormerModel(saved.nformer, variables)


class NFormerModel:
  """A loaded NFormer head: `refine(features [N, dim])` → post-BN refined vectors [N, dim].

  Attributes: `config` (the nformer settings: layers, dim, ffn, heads, k, num_landmarks, …),
  `variables`, `module` (NFormer without its classifier)."""

  def __init__(self, nf_config, variables):
    self.config = nf_config
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
