"""What a training run checks before its first step: the config's values, the datasets, that
the workdir is not in use by another run and does not hold a run of another model."""
import contextlib
import errno
import json
import math
import os
import socket
from pathlib import Path

import jax

from jaxreid import backbones
from jaxreid.data import augment

LOCK_FILE = ".jaxreid.lock"


class WorkdirBusy(ValueError):
  """Another process holds the workdir's lock."""


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds an exclusive lock on `workdir` (flock on workdir/.jaxreid.lock, released by the
  kernel when the process ends, even by SIGKILL); a second run on the same workdir stops at
  once naming the holder. On several hosts, process 0 takes it."""
  if jax.process_index() != 0:
    yield
    return
  import fcntl
  path = Path(workdir) / LOCK_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
      raise WorkdirBusy(f"workdir {workdir} is in use by another run ({holder}); wait for it to "
                        "end or pass another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
    yield
  finally:
    os.close(fd)      # releases the lock


def validate(config, kind: str) -> None:
  """One sentence for the first value of `config` no run can train with; `kind` is the
  method's ("pairwise" matchers need a map of at least two positions)."""
  t, d = config.train, config.data

  def positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer.")

  positive_int("train.epochs", t.epochs)
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if name in t:
      positive_int(f"train.{name}", t[name])
  if not isinstance(t.lr, (int, float)) or not (t.lr > 0 and math.isfinite(t.lr)):
    raise ValueError(f"train.lr={t.lr!r} must be a positive number.")
  for name in ("batch_size", "height", "width"):
    positive_int(f"data.{name}", d[name])
  positive_int("eval.batch_size", config.eval.batch_size)
  for name in ("num_threads", "num_workers"):
    value = d.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
      raise ValueError(f"data.{name}={value!r} must be an integer ≥ −1 (−1: chosen from the "
                       "core count).")
  if d.get("augment"):
    augment.check_options(d.augment.to_dict())
  if config.get("model") is None or "backbone" not in config.model and "depth" not in config.model:
    return
  backbone = backbones.get(config.model)
  h, w = backbone.output_size(config.model, d.height, d.width)
  big_h, big_w = backbone.output_size(config.model, 64 * d.height, 64 * d.width)
  stride_h, stride_w = round(64 * d.height / big_h), round(64 * d.width / big_w)
  needed = 2 if kind == "pairwise" else 1
  if d.height < stride_h or d.width < stride_w or h * w < needed:
    raise ValueError(
        f"data.height × data.width = {d.height}×{d.width} is too small for the backbone, whose "
        f"map has stride {stride_h}×{stride_w} (a {h}×{w} map)"
        + ("; local matching needs at least two map positions" if needed > 1 else "")
        + f": use at least {needed * stride_h}×{stride_w}.")


def check_workdir(workdir, config, method_name: str) -> None:
  """Stops a run whose workdir holds checkpoints of another method or another model config
  (before anything in it is overwritten), naming what the workdir holds."""
  workdir = Path(workdir)
  saved_path = workdir / "config.json"
  if not saved_path.is_file() or not any((workdir / "checkpoints").glob("[0-9]*")):
    return
  try:
    saved = json.loads(saved_path.read_text())
  except ValueError:
    return                 # unreadable: the checkpoints' own shape check still guards it
  saved_method = saved.get("method") or saved.get("model", {}).get("name")
  current = config.to_dict()
  diff = [f"model.{k} {saved['model'].get(k)!r}" for k, v in current.get("model", {}).items()
          if k in saved.get("model", {}) and _structural(k)
          and _normal(saved["model"][k]) != _normal(v)]
  for k in ("height", "width"):
    if saved.get("data", {}).get(k) not in (None, current["data"][k]):
      diff.append(f"data.{k} {saved['data'][k]!r}")
  if saved_method != method_name or diff:
    held = f"a {saved_method} run" + (f" ({', '.join(diff)})" if diff and saved_method == method_name
                                      else "")
    raise ValueError(f"workdir {workdir} holds {held}; use another --workdir, or delete "
                     f"{workdir / 'checkpoints'} to start this run there afresh.")


# Fields that do not change the model's parameters (a run may resume with another value).
_NON_STRUCTURAL = {"pretrained", "num_classes", "dropout", "drop_path", "freeze_bn",
                   "freeze_patch_embed"}


def _structural(key: str) -> bool:
  return key not in _NON_STRUCTURAL


def _normal(value):
  """JSON round-trips tuples as lists."""
  if isinstance(value, dict):
    return {k: _normal(v) for k, v in value.items()}
  return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value
