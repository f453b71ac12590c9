"""One package per method (`methods/<name>/`: its Flax modules, objective, official-checkpoint
converter and correspondence hook), each exporting a `Method` that `jaxreid.registry` lists.
Methods import the shared layers below them and never each other."""
import dataclasses
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Method:
  """What the rest of jaxreid needs to know about a method: a plain record, which the registry
  lists and the API, the command line and the training loop read.

  build(config) → the Flax model (`models.PairwiseModel` or `models.EmbeddingModel`) of
    config.model for config.data.height × width.
  objectives: train.loss → `objectives.Objective`.
  convert(state, input_size) → ({"model": overrides, "data": {height, width}}, variables) of an
    official checkpoint; detect(flat keys) → whether a state dict is one of this method's;
    export(variables) → the official checkpoint layout (NumPy), `convert`'s inverse.
  input_size: (h, w) of an official checkpoint loaded without one (default 384×128).
  correspondences(variables, probe, gallery) → argmax matches per layer, for drawing.
  describe(model config) → the method's part of the model in a few words (`ReidModel.__repr__`
    adds the backbone's).
  train(config, workdir, mesh) / evaluate(config, checkpoint, workdir) / load(checkpoint):
    replace the standard pipeline (one image model: `train.loop.train_and_evaluate` through
    `registry.train_and_evaluate`, `api.evaluate_checkpoint`, `api.ReidModel`) for a method
    with more stages.
  refiner(config, checkpoint) → refine(q, g) → (q', g'): the test-time transform of extracted
    query and gallery features that `evaluate` applies (NFormer's stage 2), for --mode=rank.
  """
  name: str
  kind: str                                   # "pairwise" | "embedding"
  build: Callable[[Any], Any] | None
  objectives: Mapping[str, Any]
  convert: Callable[..., tuple] | None = None
  detect: Callable[[list[str]], bool] | None = None
  export: Callable[[Any], dict] | None = None
  correspondences: Callable[..., dict] | None = None
  input_size: tuple[int, int] | None = None
  describe: Callable[[Any], str] = lambda m: ""
  train: Callable[..., dict] | None = None
  evaluate: Callable[..., dict] | None = None
  load: Callable[..., Any] | None = None
  refiner: Callable[..., Callable] | None = None


def has_key(keys, fragment: str) -> bool:
  """Whether some dotted key contains `fragment` at a component boundary."""
  return any(f".{k}".find(f".{fragment}") >= 0 for k in keys)
