"""The only list of methods. Everything that needs to know a method (the API, the command line,
checkpoint loading) asks here, and a run is trained here (`train_and_evaluate`); a new method is
one line in `METHODS`."""
from jaxreid.methods import (Method, embedding, kpm, nformer, pat, qaconv, transformer_pairs,
                             transmatcher)
from jaxreid.weights import flatten_state

METHODS: dict[str, Method] = {m.name: m for m in (
    qaconv.METHOD,
    transmatcher.METHOD,
    *transformer_pairs.METHODS,
    embedding.METHOD,
    nformer.method(stage1=embedding.METHOD),
    kpm.METHOD,
    pat.METHOD,
)}


def get(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"model.name={name!r} is unknown; known methods: {sorted(METHODS)}.")
  return METHODS[name]


def method_of(config) -> Method:
  """The method that trains and evaluates `config`: `config.method` where set (a pipeline on
  another method's model, e.g. NFormer), else `config.model.name`."""
  return get(config.get("method") or config.model.name)


def build_model(config):
  """The Flax model of `config.model` for inputs of `config.data.height × width`."""
  return get(config.model.name).build(config)


def detect(state) -> str | None:
  """The method an official checkpoint belongs to, from its key names (None if unknown)."""
  keys = list(flatten_state(state))
  return next((m.name for m in METHODS.values() if m.detect is not None and m.detect(keys)),
              None)


def train_and_evaluate(config, workdir, mesh=None) -> dict:
  """Trains `config` in `workdir` (resuming) with its method (see `method_of`: its own `train`,
  else the one training loop) and evaluates; {} when stopped early. The run holds the workdir's
  lock throughout (a second run on it stops at once)."""
  from jaxreid.train import loop, preflight   # the training stack only when training
  method = method_of(config)
  with preflight.workdir_lock(workdir):
    if method.train is not None:
      return method.train(config, workdir, mesh)
    return loop.train_and_evaluate(config, workdir, method, mesh)
