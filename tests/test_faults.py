"""Fault paths of a training run: divergence, reruns, signals, a busy or foreign workdir,
corrupt checkpoints, bad config values and datasets, and the command line killed at random
points; each keeps what was done and says what went wrong in one sentence."""
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import qaconv_gs
from jaxreid.checkpoint import IncompatibleCheckpoint, restore_for_eval
from jaxreid.data import pipeline
from jaxreid.registry import train_and_evaluate
from jaxreid.train import preflight
from jaxreid.train.loop import TrainingDiverged, TrainingInterrupted
from training import tiny


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(synthetic_data_dir, tmp_path):
  # lr 1e30 turns the weights non-finite in the first step (its loss is still finite).
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1, lr=1e30,
                clip_norm=0.0)
  config.train.update(log_every_steps=1, checkpoint_every_steps=1)
  with pytest.raises(TrainingDiverged, match=r"training diverged at step 1: param_norm (nan|inf); "
                                             r"nothing was saved \(no checkpoint before it\); "
                                             r"lower train.lr or set train.clip_norm"):
    train_and_evaluate(config, tmp_path)
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))   # nothing broken was saved
  assert not (tmp_path / "results.json").exists()


def test_a_run_that_diverges_later_keeps_its_good_checkpoints(synthetic_data_dir, tmp_path):
  """Checkpoints before the divergence stay, all finite; resuming diverges at the same step."""
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  config.train.update(log_every_steps=1, checkpoint_every_steps=2, stop_at_step=2)
  train_and_evaluate(config, tmp_path)                     # 2 good steps, checkpointed
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1, lr=1e30,
                clip_norm=0.0)
  config.train.update(log_every_steps=1, checkpoint_every_steps=2)
  with pytest.raises(TrainingDiverged, match=r"training diverged at step 3: param_norm (nan|inf); "
                                             r"the last checkpoint before it is kept"):
    train_and_evaluate(config, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*"))
  assert steps == [2]
  _, variables = restore_for_eval(str(tmp_path / "checkpoints" / "2"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def _metrics(results: dict) -> dict:
  """The evaluation results without wall times."""
  return {name: {k: v for k, v in m.items() if k != "seconds"}
          for name, m in results["test"].items()}


@pytest.fixture(scope="module")
def reference_run(synthetic_data_dir, tmp_path_factory):
  """An uninterrupted tiny run: (workdir, results)."""
  workdir = tmp_path_factory.mktemp("reference")
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  return workdir, train_and_evaluate(config, workdir)


def _signal_at_batches(monkeypatch, signals_at: dict):
  """Sends this process signals_at[n] (a signal or a list) just before the n-th training batch
  (counted over the whole process) is handed to the step."""
  original = pipeline.train_batches
  count = [0]

  def batches(*args, **kwargs):
    for batch in original(*args, **kwargs):
      count[0] += 1
      for signum in np.atleast_1d(signals_at.get(count[0], [])):
        os.kill(os.getpid(), int(signum))
      yield batch

  monkeypatch.setattr(pipeline, "train_batches", batches)


def test_sigterm_saves_a_checkpoint_at_the_step_and_the_rerun_resumes_exactly(
    reference_run, synthetic_data_dir, tmp_path, monkeypatch):
  _, reference = reference_run
  _signal_at_batches(monkeypatch, {3: signal.SIGTERM})
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(TrainingInterrupted, match="SIGTERM received: stopped at step 3 with a "
                                                "checkpoint; rerun the same command to resume"):
    train_and_evaluate(config, tmp_path)
  assert signal.getsignal(signal.SIGTERM) is previous       # handlers restored
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*"))
  assert steps[-1] == 3                                     # the step it was at, not step 0
  monkeypatch.undo()
  resumed = train_and_evaluate(tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1),
                               tmp_path)
  assert "resumed from step 3" in (tmp_path / "train.log").read_text()
  assert _metrics(resumed) == _metrics(reference)


def test_a_second_ctrl_c_stops_at_once_without_saving(synthetic_data_dir, tmp_path,
                                                      monkeypatch):
  _signal_at_batches(monkeypatch, {2: [signal.SIGINT, signal.SIGINT]})
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  with pytest.raises(KeyboardInterrupt) as e:
    train_and_evaluate(config, tmp_path)
  assert isinstance(e.value, TrainingInterrupted) and "SIGINT" in str(e.value)
  assert "at step" not in str(e.value)            # raised by the second signal, not the loop
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_a_second_run_on_a_workdir_in_use_stops_at_once(synthetic_data_dir, tmp_path):
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  with preflight.workdir_lock(tmp_path):
    with pytest.raises(preflight.WorkdirBusy,
                       match=rf"workdir {tmp_path} is in use by another run \(pid {os.getpid()} on "
                             rf"host {socket.gethostname()}\); wait for it to end or pass another"):
      train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()


_CONTENDER = """
import fcntl, os, sys, time
sys.path.insert(0, {root!r})
from jaxreid.train import preflight
flock = fcntl.flock
def slow_flock(fd, op):   # a holder descheduled right after it took the lock
  flock(fd, op)
  time.sleep(1.5)
fcntl.flock = slow_flock
open(os.path.join({barrier!r}, f"ready.{{os.getpid()}}"), "w").close()
while not os.path.exists(os.path.join({barrier!r}, "go")):
  time.sleep(0.002)
try:
  with preflight.workdir_lock({workdir!r}):
    print("holder", os.getpid())
    time.sleep(2)
except preflight.WorkdirBusy as e:
  print("busy", e)
"""


def test_simultaneous_runs_on_one_workdir_all_name_the_holder(tmp_path):
  """Eight processes try the lock at the same instant, the winner pausing just after taking
  it (as a descheduled process does): every loser names the winner."""
  barrier, workdir, count = tmp_path / "barrier", tmp_path / "run", 8
  barrier.mkdir()
  code = _CONTENDER.format(root=str(ROOT), barrier=str(barrier), workdir=str(workdir))
  runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"}) for _ in range(count)]
  _wait_for(lambda: len(list(barrier.glob("ready.*"))) == count, runs[0], "all contenders")
  (barrier / "go").touch()
  outputs = [r.communicate(timeout=120)[0].strip() for r in runs]
  holders = [o.split()[1] for o in outputs if o.startswith("holder")]
  assert len(holders) == 1, outputs
  named = f"(pid {holders[0]} on host {socket.gethostname()})"
  assert all(named in o for o in outputs if o.startswith("busy")), outputs
  assert sum(o.startswith("busy") for o in outputs) == count - 1, outputs


def _stopped_run(data_dir, workdir, step: int) -> None:
  """The tiny run of the reference, checkpointed every 2 steps and stopped at `step`."""
  config = tiny(qaconv_gs.get_config(), data_dir, epochs=1)
  config.train.update(checkpoint_every_steps=2, stop_at_step=step)
  assert train_and_evaluate(config, workdir) == {}


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(
    reference_run, synthetic_data_dir, tmp_path):
  _, reference = reference_run
  _stopped_run(synthetic_data_dir, tmp_path, 4)
  latest = tmp_path / "checkpoints" / "4"
  damaged = [f for f in latest.rglob("*") if f.is_file() and f.stat().st_size > 1000]
  assert damaged
  for f in damaged:                                     # truncated as by a full disk
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  with pytest.warns(UserWarning, match=rf"checkpoint {latest} cannot be read .*; moved to "
                                       rf"{tmp_path / 'corrupt_checkpoints' / '4'}, resuming"):
    resumed = train_and_evaluate(tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1),
                                 tmp_path)
  assert "resumed from step 2" in (tmp_path / "train.log").read_text()
  assert (tmp_path / "corrupt_checkpoints" / "4").is_dir()
  assert _metrics(resumed) == _metrics(reference)
  # A damaged best/ for evaluation: one sentence naming it.
  best = tmp_path / "best"
  (step,) = [p for p in best.iterdir() if p.name.isdigit()]
  for f in step.rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])
  with pytest.raises(ValueError, match=rf"checkpoint {step} cannot be read .*it is damaged"):
    restore_for_eval(str(tmp_path))


def _flip_bytes(path: Path, count: int = 64) -> None:
  """`count` bytes in the middle of `path` inverted: the file keeps its size and still parses."""
  data = bytearray(path.read_bytes())
  start = max(0, len(data) // 2 - count // 2)
  for i in range(start, min(len(data), start + count)):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _largest_file(folder: Path) -> Path:
  return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("item", ["variables", "train", "data"])
def test_flipped_bits_in_any_checkpoint_file_kind_are_found_on_restore(tmp_path, item):
  import optax
  from flax import struct
  from jaxreid.checkpoint import Checkpointer

  @struct.dataclass
  class State:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: object
    memory: dict
    rng: jax.Array

  params = {"w": np.arange(4096, dtype=np.float32)}
  tx = optax.sgd(0.1, momentum=0.9)
  config = qaconv_gs.get_config()
  ckpt = Checkpointer(tmp_path, keep=2)
  for step in (4, 6):
    state = State(step=jax.numpy.asarray(step, jax.numpy.int32),
                  params=jax.tree.map(lambda x: jax.numpy.asarray(x + step), params),
                  batch_stats={}, opt_state=tx.init(params), memory={},
                  rng=jax.random.key(step))
    ckpt.save(state, {"epoch": 0, "batch": step, "plan": np.arange(2048).reshape(64, 32)},
              config, force=True)
  ckpt.wait()
  assert all((tmp_path / "checkpoints" / s / "checksums.json").is_file() for s in ("4", "6"))
  _flip_bytes(_largest_file(tmp_path / "checkpoints" / "6" / item))
  with pytest.warns(UserWarning, match=r"checkpoints/6 cannot be read \(.* differs from the "
                                       r"checksum recorded when it was written\); moved to"):
    restored, data = Checkpointer(tmp_path, keep=2).restore_latest(state)
  assert int(restored.step) == 4 and int(data["batch"]) == 4
  np.testing.assert_array_equal(restored.params["w"], params["w"] + 4)
  assert (tmp_path / "corrupt_checkpoints" / "6").is_dir()


def test_flipped_bits_in_the_latest_checkpoint_resume_from_the_one_before(
    reference_run, synthetic_data_dir, tmp_path):
  _, reference = reference_run
  _stopped_run(synthetic_data_dir, tmp_path, 6)
  _flip_bytes(_largest_file(tmp_path / "checkpoints" / "6" / "variables"))
  with pytest.warns(UserWarning, match=r"differs from the checksum"):
    resumed = train_and_evaluate(tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1),
                                 tmp_path)
  assert "resumed from step 4" in (tmp_path / "train.log").read_text()
  assert _metrics(resumed) == _metrics(reference)
  # Flipped bits in best/: evaluation refuses it in one sentence instead of reporting nonsense.
  (step,) = [p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]
  _flip_bytes(_largest_file(step / "variables"))
  with pytest.raises(ValueError, match=rf"checkpoint {step} cannot be read .*differs from the "
                                       r"checksum.*it is damaged"):
    restore_for_eval(str(tmp_path))


def test_datasets_are_resolved_before_the_first_step(synthetic_data_dir, tmp_path):
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  config.dataset.test = "synthetic_reid/domain_b,markt1501"
  with pytest.raises(ValueError, match="unknown dataset 'markt1501'; known: cuhk03_np, "
                                       "dukemtmc_reid, market1501, msmt17"):
    train_and_evaluate(config, tmp_path / "unknown")
  config.dataset.test = "market1501"                  # a real dataset not built here
  with pytest.raises(FileNotFoundError, match="Dataset market1501 is not prepared under"):
    train_and_evaluate(config, tmp_path / "unbuilt")
  for workdir in ("unknown", "unbuilt"):
    assert not (tmp_path / workdir / "checkpoints").exists()


@pytest.mark.parametrize("field,value,message", [
    ("train.epochs", 0, "train.epochs=0 must be a positive integer."),
    ("train.lr", -0.1, "train.lr=-0.1 must be a positive number."),
    ("train.lr", float("nan"), "train.lr=nan must be a positive number."),
    ("data.batch_size", 0, "data.batch_size=0 must be a positive integer."),
    ("data.height", 16, "data.height × data.width = 16×8 is too small for the backbone, whose map "
                        "has stride 16×16 (a 1×1 map); local matching needs at least two map "
                        "positions: use at least 32×16."),
])
def test_config_values_no_run_can_train_with(field, value, message):
  config = qaconv_gs.get_config()
  group, name = field.split(".")
  config[group][name] = value
  if field == "data.height":
    config.data.width = 8
  with pytest.raises(ValueError, match=re.escape(message)):
    preflight.validate(config, "pairwise")
  preflight.validate(qaconv_gs.get_config(), "pairwise")     # the defaults pass


def test_a_workdir_of_another_model_is_refused_before_anything_is_overwritten(
    synthetic_data_dir, tmp_path):
  from configs import transmatcher
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  config.train.stop_at_step = 1
  train_and_evaluate(config, tmp_path)
  saved = (tmp_path / "config.json").read_text()
  other = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  other.model.neck = 16
  with pytest.raises(ValueError, match=rf"workdir {tmp_path} holds a qaconv run whose config "
                                       r"differs in model.neck \(32 there, 16 here\); resume it "
                                       r"with its own config"):
    train_and_evaluate(other, tmp_path)
  with pytest.raises(ValueError, match=rf"workdir {tmp_path} holds a qaconv run; use another"):
    train_and_evaluate(tiny(transmatcher.get_config(), synthetic_data_dir, epochs=1), tmp_path)
  assert (tmp_path / "config.json").read_text() == saved
  # A checkpoint of another model under an unreadable config.json: its shapes tell.
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(IncompatibleCheckpoint, match="holds another model than this config"):
    train_and_evaluate(other, tmp_path)


class _NotTensors:
  """A pickled Python object (a whole model object, an optimizer) in a .pth file."""


def test_unreadable_pytorch_files_are_one_sentence_without_unsafe_advice(tmp_path):
  import torch
  from jaxreid.weights import read_state_dict

  pickled = tmp_path / "object.pth"
  torch.save({"model": _NotTensors()}, pickled)
  truncated = tmp_path / "truncated.pth"
  torch.save({"w": torch.ones(64, 64)}, truncated)
  truncated.write_bytes(truncated.read_bytes()[:200])
  for path, reason in ((pickled, "it holds a Python object"),
                       (truncated, "the file is truncated or corrupted")):
    with pytest.raises(ValueError) as e:
      read_state_dict(path)
    text = str(e.value)
    assert text.startswith(f"{path} could not be read as a PyTorch state dict: {reason}")
    assert "weights_only=False" not in text and "False" not in text and "\n" not in text


def test_rerunning_a_finished_run_keeps_its_results(reference_run, synthetic_data_dir, tmp_path):
  """Also: two runs of one config on one machine give identical results.json."""
  _, reference = reference_run
  first = train_and_evaluate(tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1),
                             tmp_path)
  written = (tmp_path / "results.json").read_text()
  assert first["test"] and _metrics(first) == _metrics(reference)
  assert _metrics(json.loads(written)) == _metrics(json.loads(
      (reference_run[0] / "results.json").read_text()))
  again = train_and_evaluate(tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1),
                             tmp_path)
  assert again["test"] == first["test"]
  assert (tmp_path / "results.json").read_text() == written
  # Killed after the last checkpoint but before its results were written: it evaluates.
  (tmp_path / "results.json").unlink()
  third = train_and_evaluate(tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1),
                             tmp_path)
  assert _metrics(third) == _metrics(first)
  assert _metrics(json.loads((tmp_path / "results.json").read_text())) == _metrics(first)


# ------------------------------------------------------------------------------------------------
# The command line killed at random points

ROOT = Path(__file__).resolve().parents[1]
STEPS = 150            # one epoch of the tiny config on synthetic_reid/domain_a


def _command(workdir: Path, data_dir: str) -> list[str]:
  """The command line of `tiny(qaconv_gs, epochs=1)`, logging every step and checkpointing
  every other one (so that kills land in checkpoint writes)."""
  overrides = dict(
      **{"dataset.data_dir": data_dir, "model.depth": 18, "model.width": 8, "model.neck": 32,
         "data.batch_size": 16, "data.num_instances": 4, "data.num_threads": 1,
         "data.augment.color_jitter": False, "eval.batch_size": 64, "eval.tile_p": 64,
         "eval.tile_g": 256, "train.epochs": 1, "train.log_every_steps": 1,
         "train.checkpoint_every_steps": 2})
  return [sys.executable, str(ROOT / "main.py"), "--config", "configs/qaconv_gs.py",
          f"--workdir={workdir}", "--compilation_cache=~/.cache/jaxreid/xla-tests",
          *(f"--config.{k}={v}" for k, v in overrides.items())]


def _logged_step(workdir: Path) -> int:
  try:
    steps = re.findall(r"step (\d+)/", (workdir / "train.log").read_text())
  except OSError:
    return 0
  return int(steps[-1]) if steps else 0


def _wait_for(condition, process, what: str, timeout: float = 300.0) -> None:
  end = time.time() + timeout
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f"the run ended (rc {process.returncode}) before {what}: "
                           f"{process.stderr.read()[-2000:]}")
    if time.time() > end:
      process.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def _start(workdir, data_dir):
  return subprocess.Popen(_command(workdir, data_dir), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_killed_at_random_points_and_restarted_ends_like_an_uninterrupted_run(
    reference_run, synthetic_data_dir, tmp_path):
  """The command line stopped at random points (SIGTERM mid-epoch, SIGKILL during checkpoint
  writes, SIGKILL during the final evaluation), restarted each time, ends with the results of
  an uninterrupted run. The kill points come from JAXREID_FAULT_SEED (random when unset;
  printed on failure)."""
  seed = int(os.environ.get("JAXREID_FAULT_SEED", random.randrange(10**6)))
  rng = random.Random(seed)
  note = f"(JAXREID_FAULT_SEED={seed})"
  _, reference = reference_run
  workdir = tmp_path / "killed"

  # 1. SIGTERM mid-epoch: the step ends, a checkpoint is written, exit 128 + 15.
  run = _start(workdir, synthetic_data_dir)
  at = rng.randrange(2, 60)
  _wait_for(lambda: _logged_step(workdir) >= at, run, f"step {at} {note}")
  run.send_signal(signal.SIGTERM)
  _, err = run.communicate(timeout=120)
  assert run.returncode == 128 + signal.SIGTERM, (note, err[-2000:])
  stopped = re.search(r"SIGTERM received: stopped at step (\d+) with a checkpoint", err)
  assert stopped, (note, err[-2000:])
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*"))
  assert saved[-1] == int(stopped.group(1)) >= at, (note, saved)

  # 2. SIGKILL at a random moment (checkpoints are written every other step); meanwhile a
  #    second run on the same workdir is refused at once.
  run = _start(workdir, synthetic_data_dir)
  at = rng.randrange(int(stopped.group(1)) + 4, STEPS - 10)
  _wait_for(lambda: _logged_step(workdir) > int(stopped.group(1)), run, f"the restart {note}")
  second = subprocess.run(_command(workdir, synthetic_data_dir), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert second.returncode == 2, (note, second.stderr[-2000:])
  assert f"is in use by another run (pid {run.pid} on host" in second.stderr, second.stderr
  _wait_for(lambda: _logged_step(workdir) >= at, run, f"step {at} {note}")
  time.sleep(rng.uniform(0.0, 0.2))
  run.kill()
  run.communicate(timeout=60)

  # 3. SIGKILL during the final evaluation (after the last step's checkpoint).
  run = _start(workdir, synthetic_data_dir)
  final = workdir / "checkpoints" / str(STEPS)
  _wait_for(final.is_dir, run, f"the final checkpoint {note}")
  run.kill()
  run.communicate(timeout=60)
  assert not (workdir / "results.json").exists(), note    # killed before the results

  # 4. The last restart evaluates and reports what the uninterrupted run reported.
  run = _start(workdir, synthetic_data_dir)
  _, err = run.communicate(timeout=600)
  assert run.returncode == 0, (note, err[-3000:])
  results = json.loads((workdir / "results.json").read_text())
  assert _metrics(results) == _metrics(reference), note
  assert results["step"] == reference["step"] == STEPS


def _checkpoint_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.name.isdigit())


def test_sigterm_during_start_up_is_one_sentence(synthetic_data_dir, tmp_path):
  run = _start(tmp_path, synthetic_data_dir)
  for line in run.stderr:          # start-up: config parsed, JAX up, datasets and model next
    if line.startswith("devices:"):
      break
  run.send_signal(signal.SIGTERM)
  _, err = run.communicate(timeout=120)
  assert run.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert [l for l in err.splitlines() if l.strip()] == [
      "stopped: SIGTERM received before training began or after its last checkpoint; rerun the "
      "same command to start or resume the run"]
  assert not _checkpoint_steps(tmp_path)


def test_a_second_sigterm_during_the_checkpoint_write_lets_it_finish_and_stops_quietly(
    synthetic_data_dir, tmp_path):
  """The first SIGTERM as the step-4 checkpoint is written (the loop ends step 5 and saves it),
  the second inside that save: the write completes (sealed), the process ends with one
  sentence and no traceback, and the rerun resumes from step 5."""
  command = _command(tmp_path, synthetic_data_dir)
  command[1] = str(ROOT / "tests" / "faulty_main.py")
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAXREID_SIGTERM_AT_SAVES": "2,3"})
  assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "Event loop" not in out.stderr, out.stderr[-3000:]
  assert [l for l in out.stderr.splitlines() if "stopped" in l] == [
      "stopped: SIGTERM received: stopped; rerun the same command to resume from the last "
      "checkpoint"]
  assert _checkpoint_steps(tmp_path)[-1] == 5
  assert (tmp_path / "checkpoints" / "5" / "checksums.json").is_file()     # complete, sealed
  rerun = subprocess.run(_command(tmp_path, synthetic_data_dir) + ["--config.train.stop_at_step=6"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 5" in (tmp_path / "train.log").read_text()


def test_a_failed_checkpoint_write_is_one_sentence_and_keeps_the_earlier_ones(tmp_path):
  """A write that fails (a file-size limit stands in for a full disk) raises one sentence; the
  checkpoint before it still restores."""
  import resource

  import jax.numpy as jnp
  import ml_collections
  from jaxreid.checkpoint import Checkpointer, CheckpointWriteError
  from jaxreid.train.state import TrainState

  def state(step, size):
    return TrainState(step=jnp.asarray(step, jnp.int32),
                      params={"w": jnp.arange(size, dtype=jnp.float32)}, batch_stats={},
                      opt_state={}, memory={}, rng=jax.random.key_data(jax.random.key(0)))

  config = ml_collections.ConfigDict({"seed": 0})
  data = {"epoch": 0, "batch": 1, "plan": np.zeros((1, 1), np.int32)}
  ckpt = Checkpointer(tmp_path)
  ckpt.save(state(1, 10), data, config, force=True)
  ckpt.wait()
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a failed write, not a kill
  resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limits[1]))
  try:
    with pytest.raises(CheckpointWriteError) as e:
      ckpt.save(state(2, 1_000_000), data, config, force=True)
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, previous)
  assert str(e.value) == (
      f"could not write a checkpoint under {tmp_path / 'checkpoints'} (File too large); the "
      "checkpoints saved before it are intact: free disk space or fix the folder's "
      "permissions, then rerun to resume.")
  ckpt.close()
  restored, _ = Checkpointer(tmp_path).restore_latest(state(0, 10))
  assert int(restored.step) == 1
  np.testing.assert_array_equal(restored.params["w"], np.arange(10, dtype=np.float32))


def test_loading_a_run_as_another_method_names_both(reference_run):
  import jaxreid
  workdir, _ = reference_run
  with pytest.raises(ValueError) as e:
    jaxreid.load("vit", workdir)
  assert str(e.value) == (f"{workdir} holds a qaconv run, but 'vit' (model embedding) was asked "
                          "for; load it with jaxreid.load('qaconv', …) or --config qaconv.")
