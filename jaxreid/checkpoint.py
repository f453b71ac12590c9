"""Orbax checkpoints of a run: the last n for resuming, the best by mAP for evaluation.

Each checkpoint holds four items: `variables` (params, batch_stats), `train` (optimiser state,
class memory, RNG, step), `data` (epoch, next batch, the epoch's batch plan) and `config`.
Evaluation restores `variables` and `config` only.
"""
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

LAST, BEST = "checkpoints", "best"


class Checkpointer:
  """Two managers under `workdir`: `checkpoints/` (keep last n) and `best/` (max mAP)."""

  def __init__(self, workdir: str, keep: int = 2):
    workdir = Path(workdir).absolute()
    self.last = ocp.CheckpointManager(
        workdir / LAST, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        workdir / BEST, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["mAP"], best_mode="max"))

  def save(self, state, data_state: dict, config, *, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    if step in self.last.all_steps():
      return
    self.last.save(step, args=_save_args(state, data_state, config), force=force)

  def save_best(self, state, config, metrics: dict) -> None:
    step = int(jax.device_get(state.step))
    if step in self.best.all_steps():
      return
    self.best.save(step, metrics={"mAP": float(metrics["mAP"])}, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(_variables(state)),
        config=ocp.args.JsonSave(config.to_dict())))

  def restore_latest(self, state):
    """(state, data_state) from the latest checkpoint, restored onto `state`'s shardings, or
    None when there is none."""
    step = self.last.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    out = self.last.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(_variables(abstract)),
        train=ocp.args.StandardRestore(_train_part(abstract)),
        data=ocp.args.StandardRestore()))
    restored = state.replace(params=out.variables["params"],
                             batch_stats=out.variables["batch_stats"], **out.train)
    data = {k: np.asarray(v) for k, v in out.data.items()}
    return restored, data

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.last.close()
    self.best.close()


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _train_part(state) -> dict:
  return {"opt_state": state.opt_state, "memory": state.memory, "rng": state.rng,
          "step": state.step}


def _save_args(state, data_state, config):
  return ocp.args.Composite(
      variables=ocp.args.StandardSave(_variables(state)),
      train=ocp.args.StandardSave(_train_part(state)),
      data=ocp.args.StandardSave({k: np.asarray(v) for k, v in data_state.items()}),
      config=ocp.args.JsonSave(config.to_dict()))


def find_checkpoint(path: str) -> tuple[Path, int]:
  """(manager directory, step) for a workdir, a `best/` or `checkpoints/` dir, or a step dir.

  A workdir resolves to its best checkpoint if it has one, else its latest.
  """
  path = Path(os.path.expanduser(path)).absolute()
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {path} does not exist; pass a workdir of a training run "
                            "or an official .pth/.safetensors file.")
  candidates = [path / BEST, path / LAST, path]
  for directory in candidates:
    steps = _steps(directory)
    if steps:
      if directory.name == BEST:
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            best_fn=lambda m: m["mAP"], best_mode="max"))
        step = manager.best_step()
        manager.close()
        return directory, step if step is not None else max(steps)
      return directory, max(steps)
  if path.name.isdigit() and (path / "variables").exists():
    return path.parent, int(path.name)
  raise FileNotFoundError(f"No jaxreid checkpoint found in {path}: expected a workdir with "
                          f"'{BEST}/' or '{LAST}/', or a numbered step directory.")


def _steps(directory: Path) -> list[int]:
  if not directory.is_dir():
    return []
  return [int(p.name) for p in directory.iterdir()
          if p.name.isdigit() and (p / "variables").exists()]


def restore_for_eval(path: str):
  """(config, variables) of a run's checkpoint, as host NumPy arrays; no optimiser state.

  Works whatever devices saved it (a pod slice's checkpoint restores on a laptop).
  """
  directory, step = find_checkpoint(path)
  manager = ocp.CheckpointManager(directory, item_handlers={
      "variables": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        manager.item_metadata(step)["variables"])
  out = manager.restore(step, args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
  manager.close()
  config = ml_collections.ConfigDict(_tuples(out.config))
  return config, jax.tree.map(np.asarray, out.variables)


def _tuples(tree):
  """JSON turns tuples into lists; configs use tuples for sequences."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree
