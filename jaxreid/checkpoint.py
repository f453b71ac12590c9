"""Orbax checkpoints of a run: the last n for resuming, the best by mAP for evaluation.

Each checkpoint holds four items: `variables` (params, batch_stats), `train` (optimiser state,
class memory, RNG, step), `data` (epoch, next batch, the epoch's batch plan) and `config`.
Evaluation restores `variables` and `config` only.

Once a checkpoint is written, `checksums.json` in its folder records the SHA-256 of each of its
files; a restore (resume or evaluation) verifies them first, so silent damage (flipped bits) is
found like a truncated file: a resume falls back to the checkpoint before it, an evaluation says
the checkpoint is damaged.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

LAST, BEST, CORRUPT = "checkpoints", "best", "corrupt_checkpoints"


class IncompatibleCheckpoint(ValueError):
  """A checkpoint of another model (its parameters have other names or shapes)."""


class Checkpointer:
  """Two managers under `workdir`: `checkpoints/` (keep last n) and `best/` (max mAP)."""

  def __init__(self, workdir: str, keep: int = 2):
    workdir = Path(workdir).absolute()
    self.last = ocp.CheckpointManager(
        workdir / LAST, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={"variables": ocp.StandardCheckpointHandler(),
                       "train": ocp.StandardCheckpointHandler(),
                       "data": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    self.best = ocp.CheckpointManager(
        workdir / BEST, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["mAP"], best_mode="max"))

  def save(self, state, data_state: dict, config, *, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    if step in self.last.all_steps():
      return
    with _writing(self.last.directory):
      self.last.wait_until_finished()   # the previous write: sealed before the next starts
      _seal(self.last.directory)
      self.last.save(step, args=_save_args(state, data_state, config), force=force)

  def save_best(self, state, config, metrics: dict) -> None:
    step = int(jax.device_get(state.step))
    if step in self.best.all_steps():
      return
    with _writing(self.best.directory):
      self.best.wait_until_finished()
      _seal(self.best.directory)
      self.best.save(step, metrics={"mAP": float(metrics["mAP"])}, args=ocp.args.Composite(
          variables=ocp.args.StandardSave(_variables(state)),
          config=ocp.args.JsonSave(config.to_dict())))

  def restore_latest(self, state):
    """(state, data_state) from the latest readable checkpoint, restored onto `state`'s
    shardings, or None when there is none. A checkpoint that cannot be read (a truncated file)
    is moved to `corrupt_checkpoints/` with a warning and the one before it is restored."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(self.last.all_steps(), reverse=True):
      try:
        verify(self.last.directory / str(step))
        _check_shapes(self.last.item_metadata(step)["variables"], _variables(abstract),
                      self.last.directory / str(step))
        out = self.last.restore(step, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(_variables(abstract)),
            train=ocp.args.StandardRestore(_train_part(abstract)),
            data=ocp.args.StandardRestore()))
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # noqa: BLE001 - any read error: fall back to the previous one
        if "tree structure" in str(e):   # it reads, but holds another optimiser or memory
          raise IncompatibleCheckpoint(
              f"checkpoint {self.last.directory / str(step)} holds the optimiser state or "
              "memory of another config (train.optimizer, train.loss, …); resume with the run's "
              "own config, or use another --workdir.") from None
        self._set_aside(step, e)
        continue
      restored = state.replace(params=out.variables["params"],
                               batch_stats=out.variables["batch_stats"], **out.train)
      data = {k: np.asarray(v) for k, v in out.data.items()}
      return restored, data
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    source = self.last.directory / str(step)
    target = self.last.directory.parent / CORRUPT / str(step)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
      target = target.with_name(f"{step}-{len(list(target.parent.iterdir()))}")
    earlier = any(s < step for s in self.last.all_steps())
    warnings.warn(f"checkpoint {source} cannot be read ({_first_line(error)}); moved to "
                  f"{target}, " + ("resuming from the checkpoint before it." if earlier else
                                   "and there is none before it: training starts afresh."),
                  stacklevel=3)
    if jax.process_index() == 0:
      shutil.move(str(source), str(target))
    self.last.reload()

  def wait(self) -> None:
    """Blocks until the asynchronous writes are done and seals them; CheckpointWriteError if
    one failed."""
    for manager in (self.last, self.best):
      with _writing(manager.directory):
        manager.wait_until_finished()
        _seal(manager.directory)

  def close(self) -> None:
    for manager in (self.last, self.best):
      with _writing(manager.directory):
        manager.close()


CHECKSUMS = "checksums.json"


class DamagedCheckpoint(ValueError):
  """A checkpoint whose files no longer have the checksums recorded when it was written."""


def _files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _seal(directory: Path) -> None:
  """Writes checksums.json into every finished (committed) step folder of `directory` that has
  none yet; process 0 only."""
  if jax.process_index() != 0 or not Path(directory).is_dir():
    return
  for step_dir in Path(directory).iterdir():
    if (step_dir.name.isdigit() and (step_dir / "commit_success.txt").exists()
        and not (step_dir / CHECKSUMS).exists()):
      sums = {str(p.relative_to(step_dir)): _sha256(p) for p in _files(step_dir)}
      partial = step_dir / f".{CHECKSUMS}.partial"
      partial.write_text(json.dumps(sums, indent=0))
      os.replace(partial, step_dir / CHECKSUMS)


def verify(step_dir: Path) -> None:
  """DamagedCheckpoint when a file of `step_dir` is missing or differs from checksums.json
  (a checkpoint without one, written before it was sealed, is taken as it is)."""
  step_dir = Path(step_dir)
  try:
    sums = json.loads((step_dir / CHECKSUMS).read_text())
  except FileNotFoundError:
    return
  except ValueError:
    raise DamagedCheckpoint(f"{step_dir / CHECKSUMS} is unreadable") from None
  for name, digest in sums.items():
    path = step_dir / name
    if not path.is_file() or _sha256(path) != digest:
      raise DamagedCheckpoint(f"{name} differs from the checksum recorded when it was written")


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (full disk, permissions); earlier ones are intact."""


@contextlib.contextmanager
def _writing(directory):
  """Turns a failed (possibly asynchronous) checkpoint write into one sentence."""
  try:
    yield
  except CheckpointWriteError:
    raise
  except Exception as e:  # noqa: BLE001 - TensorStore/Orbax raise ValueError, OSError, …
    found = re.search(r":\s*([^:\[\]\"]+?)\s*\[os_error_code", str(e))
    reason = found.group(1) if found else _first_line(e)
    raise CheckpointWriteError(
        f"could not write a checkpoint under {directory} ({reason}); the checkpoints saved "
        "before it are intact: free disk space or fix the folder's permissions, then rerun to "
        "resume.") from None


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


def save_for_eval(workdir, config, variables, step: int = 0) -> Path:
  """`workdir/best/<step>` holding only `variables` and `config`, as a run's best checkpoint
  holds them (no mAP: it was not measured): what `restore_for_eval`, `jaxreid.load` and
  --mode=eval read. Refuses a folder that already holds a checkpoint. Returns the step folder."""
  directory = Path(workdir).absolute() / BEST
  if _steps(directory):
    raise ValueError(f"{directory} already holds a checkpoint; pass an empty --output folder.")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                                  item_handlers={"variables": ocp.StandardCheckpointHandler(),
                                                 "config": ocp.JsonCheckpointHandler()})
  try:
    with _writing(directory):
      manager.save(step, args=ocp.args.Composite(
          variables=ocp.args.StandardSave(jax.tree.map(np.asarray, variables)),
          config=ocp.args.JsonSave(config.to_dict())))
      manager.wait_until_finished()
      _seal(directory)
  finally:
    manager.close()
  return directory / str(step)


def has_checkpoint(workdir) -> bool:
  """Whether `workdir` holds a checkpoint a run resumes from."""
  return bool(_steps(Path(workdir) / LAST))


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
  try:
    verify(directory / str(step))
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          manager.item_metadata(step)["variables"])
    out = manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001 - a truncated or damaged file
    raise ValueError(f"checkpoint {directory / str(step)} cannot be read ({_first_line(e)}); it "
                     "is damaged: evaluate another checkpoint of the run (its checkpoints/ "
                     "folder) or train again.") from None
  finally:
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


def _check_shapes(saved, expected, where) -> None:
  """Raises IncompatibleCheckpoint when the saved arrays' names or shapes differ from
  `expected`'s (a checkpoint that reads but does not fit is not corrupt: nothing is moved)."""
  saved = getattr(saved, "tree", saved)
  saved_flat = {jax.tree_util.keystr(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  expected_flat = {jax.tree_util.keystr(k): tuple(v.shape)
                   for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  if saved_flat == expected_flat:
    return
  differing = sorted(set(saved_flat) ^ set(expected_flat)) or sorted(
      k for k in saved_flat if saved_flat[k] != expected_flat[k])
  key = differing[0]
  raise IncompatibleCheckpoint(
      f"checkpoint {where} holds another model than this config builds (first difference: "
      f"{key} {saved_flat.get(key, 'missing')} saved, {expected_flat.get(key, 'missing')} "
      "here); resume with the run's own config, or use another --workdir.")


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:200]
