"""What a training run checks before its first step: the config's values, the datasets, that
the workdir is not in use by another run and does not hold a run of another model."""
import contextlib
import errno
import json
import math
import os
import socket
import time
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
      raise WorkdirBusy(f"workdir {workdir} is in use by another run ({_lock_holder(fd)}); wait "
                        "for it to end or pass another --workdir.") from None
    name = f"pid {os.getpid()} on host {socket.gethostname()}".encode()
    os.pwrite(fd, name, 0)     # for runs on other hosts (a shared filesystem): no empty moment
    os.ftruncate(fd, len(name))
    yield
  finally:
    os.close(fd)      # releases the lock


def _lock_holder(fd: int) -> str:
  """Who holds the flock on `fd`'s file. On this host the kernel says, from the moment the
  lock is taken (/proc/locks: the holder's pid), so a holder that has not yet run another
  instruction is named too; otherwise (another host on a shared filesystem, no /proc) the name
  the holder wrote into the file."""
  inode = os.fstat(fd).st_ino
  try:
    with open("/proc/locks") as f:
      for line in f:   # "1: FLOCK  ADVISORY  WRITE 8483 fe:00:2146415 0 EOF" ("->": waiting)
        fields = line.split()
        if (len(fields) > 5 and fields[1] == "FLOCK" and fields[3] == "WRITE"
            and fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4] != "0"):
          return f"pid {fields[4]} on host {socket.gethostname()}"
  except OSError:
    pass
  holder = ""
  for _ in range(100):   # a holder on another host writes its name just after taking the lock
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if holder:
      break
    time.sleep(0.01)
  return holder or "unknown"


def _integer(name: str, value, minimum: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} must be "
                     + ("a positive integer." if minimum == 1 else f"an integer ≥ {minimum}."))


def _number(name: str, value, low: float, high: float = math.inf, *, open_low: bool = False,
            meaning: str = "") -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or value < low or (open_low and value == low) or value > high:
    bound = (f"in {'(' if open_low else '['}{low:g}, {high:g}]" if high < math.inf else
             f"{'>' if open_low else '≥'} {low:g}")
    raise ValueError(f"{name}={value!r} must be a finite number {bound}{meaning}.")


def _bool(name: str, value) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name}={value!r} must be True or False.")


def validate(config, kind: str) -> None:
  """One sentence for the first value of `config` no run can train with, or evaluate with,
  checked before anything is loaded; `kind` is the method's ("pairwise" matchers need a map of
  at least two positions)."""
  t, d = config.train, config.data
  _integer("train.epochs", t.epochs)
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if name in t:
      _integer(f"train.{name}", t[name])
  if t.get("stop_at_step") is not None:
    _integer("train.stop_at_step", t.stop_at_step)
  _integer("train.eval_every_epochs", t.get("eval_every_epochs", 0), 0)
  if not isinstance(t.lr, (int, float)) or not (t.lr > 0 and math.isfinite(t.lr)):
    raise ValueError(f"train.lr={t.lr!r} must be a positive number.")
  if "momentum" in t:
    _number("train.momentum", t.momentum, 0.0, 1.0)
  for name in ("weight_decay", "clip_norm", "backbone_lr_mult"):
    if name in t:
      _number(f"train.{name}", t[name], 0.0)
  if "lr_step_factor" in t:
    _number("train.lr_step_factor", t.lr_step_factor, 0.0, open_low=True)
  steps = t.get("lr_step_epochs", ())
  if not isinstance(steps, (tuple, list)) or any(
      not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in steps):
    raise ValueError(f"train.lr_step_epochs={steps!r} must be a tuple of epoch numbers, e.g. "
                     "--config.train.lr_step_epochs='(40, 70)'.")
  for name in ("batch_size", "height", "width"):
    _integer(f"data.{name}", d[name])
  validate_eval(config)
  _integer("data.num_threads", d.get("num_threads", 0), -1)
  _integer("data.num_workers", d.get("num_workers", 0), -1)
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


# A run resumes with the config it started with, except these fields (a prefix ending in "."
# covers a section) and those its method adds (`check_workdir`): where it stops, how often it
# logs, checkpoints and evaluates, how it evaluates and on which test sets, where its data live
# and how the host loads them, the ImageNet file read only before the first step, the learning
# rate and clipping (what a diverged run is resumed with).
RESUMABLE = ("train.stop_at_step", "train.log_every_steps", "train.checkpoint_every_steps",
             "train.lr", "train.clip_norm", "train.keep_checkpoints", "train.eval_every_epochs", "eval.", "dataset.test",
             "dataset.data_dir", "dataset.manual_dir", "dataset.skip_bad_images",
             "data.num_threads", "data.num_workers", "model.pretrained")
# Filled in from the training split when the config leaves them 0 (config.json holds the value).
FILLED_AT_START = ("model.num_classes",)


def validate_eval(config) -> None:
  """One sentence for the first evaluation field (eval.*) no evaluation can run with."""
  from jaxreid.eval.evaluator import DISTANCES
  e = config.eval
  for name in ("batch_size", "tile_p", "tile_g", "max_rank"):
    _integer(f"eval.{name}", e[name])
  for name in ("rescore_top_k", "retrieval_top_k", "gallery_chunk"):
    if name in e:
      _integer(f"eval.{name}", e[name], 0)
  if e.get("gallery_chunk", 0) % e.batch_size:
    raise ValueError(f"eval.gallery_chunk={e.gallery_chunk} must be a multiple of "
                     f"eval.batch_size ({e.batch_size}), or 0.")
  if e.get("distance", "sigmoid") not in DISTANCES:
    raise ValueError(f"eval.distance={e.distance!r} must be one of {', '.join(DISTANCES)}.")
  for name in ("rerank", "tlift", "stream"):
    if name in e:
      _bool(f"eval.{name}", e[name])
  for name in ("rerank_k1", "rerank_k2", "tlift_k"):
    if name in e:
      _integer(f"eval.{name}", e[name])
  if "rerank_lambda" in e:
    _number("eval.rerank_lambda", e.rerank_lambda, 0.0, 1.0)
  if e.get("random_walk_alpha", 0.0):
    _number("eval.random_walk_alpha", e.random_walk_alpha, 0.0, 0.999,
            meaning=" (0 = off; 1 makes the walk singular)")
    if not e.get("rescore_top_k", 0):
      raise ValueError("eval.random_walk_alpha > 0 walks over each query's top-k gallery "
                       "entries; set eval.rescore_top_k (the authors' 75), or set the alpha to 0.")
  for name in ("tlift_tau", "tlift_sigma"):
    if name in e:
      _number(f"eval.{name}", e[name], 0.0, open_low=True, meaning=" (seconds)")
  if "tlift_alpha" in e:
    _number("eval.tlift_alpha", e.tlift_alpha, 0.0)
  for name in ("probes_on_device_mb", "rerank_in_memory_mb"):
    if name in e:
      _number(f"eval.{name}", e[name], 0.0)


def check_step_fields(step, state, config) -> None:
  """Traces the train step on abstract inputs (nothing is computed): a field the objective
  train.loss reads that this config lacks is one sentence here, not a traceback at the first
  step."""
  import jax
  import numpy as np
  d = config.data
  batch = {"image": np.zeros((d.batch_size, d.height, d.width, 3), np.uint8),
           "label": np.zeros(d.batch_size, np.int32), "index": np.zeros(d.batch_size, np.int32)}
  if d.get("augment"):
    factors = augment.draw(np.random.default_rng(0), height=d.height, width=d.width,
                           **d.augment.to_dict())
    if factors:
      batch["augment"] = jax.tree.map(lambda x: np.stack([x] * d.batch_size), factors)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  try:
    jax.eval_shape(step, state, batch)
  except AttributeError as e:
    missing = e.args[0] if e.args and isinstance(e.args[0], KeyError) else None
    if missing is None:
      raise
    field = str(missing.args[0]).strip("'\"")
    raise ValueError(f"train.loss={config.train.loss!r} needs the config field {field!r}, which "
                     "this config does not have; use the config file written for that loss, or "
                     "another train.loss.") from None


def check_workdir(workdir, config, method_name: str, resumable: tuple[str, ...] = ()) -> None:
  """Stops a run, before anything in `workdir` is overwritten, when the workdir holds a run
  (checkpoints, best/ or results.json) of another method or of a config that differs in a field
  a resume may not change (not in RESUMABLE or `resumable`), naming the fields and both
  values."""
  workdir = Path(workdir)
  held = any(any((workdir / d).glob("[0-9]*")) for d in ("checkpoints", "best")) or (
      workdir / "results.json").is_file()
  saved_path = workdir / "config.json"
  if not held:
    return
  try:
    saved = json.loads(saved_path.read_text())
  except (OSError, ValueError):
    return                 # unreadable: the checkpoints' own shape check still guards it
  saved_method = saved.get("method") or saved.get("model", {}).get("name")
  afresh = f"use another --workdir, or delete {workdir} to start this run there afresh"
  if saved_method != method_name:
    raise ValueError(f"workdir {workdir} holds a {saved_method} run; {afresh}.")
  diff = config_differences(saved, config.to_dict(), RESUMABLE + tuple(resumable))
  if diff:
    shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
    raise ValueError(f"workdir {workdir} holds a {saved_method} run whose config differs in "
                     f"{shown}; resume it with its own config ({saved_path}), or {afresh}.")


def config_differences(saved: dict, current: dict,
                       resumable: tuple[str, ...] = RESUMABLE) -> list[str]:
  """"field (saved value there, current value here)" for every field both configs have that
  differs and that a resume may not change (not in `resumable`)."""
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  out = []
  for key, value in current_flat.items():
    if key not in saved_flat or any(key == r or (r.endswith(".") and key.startswith(r))
                                    for r in resumable):
      continue
    if key in FILLED_AT_START and not value:
      continue
    if _normal(saved_flat[key]) != _normal(value):
      out.append(f"{key} ({saved_flat[key]!r} there, {value!r} here)")
  return out


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def _normal(value):
  """JSON round-trips tuples as lists."""
  if isinstance(value, dict):
    return {k: _normal(v) for k, v in value.items()}
  return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value
