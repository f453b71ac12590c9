"""A run's config against its workdir, through the command line: a resume with a changed config
stops before touching anything and names the fields; another method is refused whatever the
workdir still holds; a finished run re-evaluates only when its test sets or eval settings
changed (keeping the old results); every eval and train field is checked before the first step."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.depth": 18, "model.width": 8, "model.neck": 32, "data.batch_size": 16,
        "data.num_instances": 4, "data.num_threads": 1, "eval.batch_size": 64,
        "eval.tile_p": 64, "eval.tile_g": 256, "train.epochs": 1, "train.log_every_steps": 1,
        "train.checkpoint_every_steps": 2}


def _main(workdir, data_dir, *extra, config="configs/qaconv_gs.py", tiny=True):
  overrides = {"dataset.data_dir": data_dir, **(TINY if tiny else {})}
  command = [sys.executable, str(ROOT / "main.py"), "--config", config, f"--workdir={workdir}",
             "--compilation_cache=~/.cache/jaxreid/xla-tests",
             *(f"--config.{k}={v}" for k, v in overrides.items()), *extra]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def _one_sentence(out) -> str:
  """The error line of a run that stopped with a user's mistake (rc 2, no traceback)."""
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  (line,) = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  return line


def _tree(workdir: Path) -> dict:
  return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.rglob("*")
          if p.is_file() and "tensorboard" not in p.parts
          and p.name not in ("train.log", ".jaxreid.lock")}


def test_a_resume_with_another_optimizer_or_loss_stops_and_moves_nothing(synthetic_data_dir,
                                                                         tmp_path):
  out = _main(tmp_path, synthetic_data_dir, "--config.train.stop_at_step=6")
  assert out.returncode == 0, out.stderr[-3000:]
  before = _tree(tmp_path)
  assert {"4", "6"} <= {p.name for p in (tmp_path / "checkpoints").iterdir()}
  for change, field in (("--config.train.optimizer=adam", "train.optimizer ('sgd' there, "
                                                          "'adam' here)"),
                        ("--config.train.loss=memory", "train.loss ('pairwise' there, "
                                                       "'memory' here)")):
    line = _one_sentence(_main(tmp_path, synthetic_data_dir, change))
    assert field in line and f"resume it with its own config ({tmp_path / 'config.json'})" in line
    assert _tree(tmp_path) == before                      # nothing moved, nothing rewritten
    assert not (tmp_path / "corrupt_checkpoints").exists()
  # A change a resume may make (where to stop, how often to log) resumes.
  out = _main(tmp_path, synthetic_data_dir, "--config.train.stop_at_step=8",
              "--config.train.log_every_steps=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 6" in (tmp_path / "train.log").read_text()


def test_a_loss_whose_fields_the_config_lacks_is_one_sentence_before_any_step(
    synthetic_data_dir, tmp_path):
  line = _one_sentence(_main(tmp_path, synthetic_data_dir, "--config.train.loss=memory"))
  assert "train.loss='memory' needs the config field 'focal_gamma'" in line
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_another_method_is_refused_by_what_the_workdir_still_holds(synthetic_data_dir, tmp_path):
  out = _main(tmp_path, synthetic_data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  shutil.rmtree(tmp_path / "checkpoints")                 # the old advice: best/ stays
  config_json, results = ((tmp_path / f).read_text() for f in ("config.json", "results.json"))
  line = _one_sentence(_main(tmp_path, synthetic_data_dir, "--config.model.ffn=32",
                             config="configs/transmatcher.py"))
  assert line == (f"error: workdir {tmp_path} holds a qaconv run; use another --workdir, or "
                  f"delete {tmp_path} to start this run there afresh.")
  assert (tmp_path / "config.json").read_text() == config_json
  assert (tmp_path / "results.json").read_text() == results
  out = _main(tmp_path, synthetic_data_dir, "--mode=eval")  # the run still evaluates
  assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("every", [2, 4])   # the last step (150) a multiple of it or not
def test_a_finished_run_is_evaluated_again_only_under_other_settings(synthetic_data_dir,
                                                                     tmp_path, every):
  from configs import qaconv_gs
  from jaxreid.registry import train_and_evaluate
  from training import tiny

  def config(test="synthetic_reid/domain_b"):
    c = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
    c.train.checkpoint_every_steps = every
    c.dataset.test = test
    return c

  first = train_and_evaluate(config(), tmp_path)
  written = (tmp_path / "results.json").read_text()
  assert train_and_evaluate(config(), tmp_path)["test"] == first["test"]
  assert (tmp_path / "results.json").read_text() == written
  assert "evaluated with these settings before" in (tmp_path / "train.log").read_text()
  assert not (tmp_path / "results_history").exists()
  again = train_and_evaluate(config("synthetic_reid/domain_a"), tmp_path)
  assert list(again["test"]) == ["synthetic_reid/domain_a"] and again["step"] == first["step"]
  assert json.loads((tmp_path / "results.json").read_text())["test"] == again["test"]
  (kept,) = (tmp_path / "results_history").iterdir()
  assert kept.read_text() == written                 # the old results, with their settings
  assert json.loads(written)["eval_settings"]["test"] == "synthetic_reid/domain_b"


@pytest.mark.parametrize("override,message", [
    ("eval.max_rank=0", "eval.max_rank=0 must be a positive integer."),
    ("eval.rescore_top_k=-1", "eval.rescore_top_k=-1 must be an integer ≥ 0."),
    ("eval.distance=bogus", "eval.distance='bogus' must be one of sigmoid, neg."),
    ("eval.rerank_k1=0", "eval.rerank_k1=0 must be a positive integer."),
    ("eval.rerank_lambda=1.5", "eval.rerank_lambda=1.5 must be a finite number in [0, 1]."),
    ("eval.random_walk_alpha=1.0", "eval.random_walk_alpha=1.0 must be a finite number in "
     "[0, 0.999] (0 = off; 1 makes the walk singular)."),
    ("eval.random_walk_alpha=0.9", "eval.random_walk_alpha > 0 walks over each query's top-k "
     "gallery entries; set eval.rescore_top_k"),
    ("train.lr_step_epochs=abc", "train.lr_step_epochs="),
    ("train.momentum=nan", "train.momentum=nan must be a finite number in [0, 1]."),
    ("train.stop_at_step=-1", "train.stop_at_step=-1 must be a positive integer."),
])
def test_bad_fields_stop_before_the_first_step(synthetic_data_dir, tmp_path, override, message):
  line = _one_sentence(_main(tmp_path, synthetic_data_dir, f"--config.{override}"))
  assert message in line, line
  assert not (tmp_path / "checkpoints").exists()


def test_eval_mode_checks_eval_fields_before_loading(tmp_path):
  out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", "configs/qaconv_gs.py",
                        "--mode=eval", f"--workdir={tmp_path}", "--config.eval.max_rank=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert re.search(r"error: eval.max_rank=0 must be a positive integer", _one_sentence(out))


# ------------------------------------------------------------------------------------------------
# A full disk


def _mounted_tmpfs(path: Path, megabytes: int) -> None:
  path.mkdir(parents=True, exist_ok=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                 check=True, capture_output=True)


def test_a_disk_that_fills_up_is_one_sentence_and_the_rerun_completes(synthetic_data_dir,
                                                                      tmp_path):
  """A real small filesystem (tmpfs): the disk fills up during a checkpoint write; one sentence,
  the earlier checkpoints intact, and once there is room again the rerun finishes."""
  disk = tmp_path / "disk"
  _mounted_tmpfs(disk, 2)    # two tiny checkpoints (~0.85 MB each) fit, a third does not
  try:
    workdir = disk / "run"
    out = _main(workdir, synthetic_data_dir)
    line = _one_sentence(out)
    assert "could not write a checkpoint under" in line and "No space left" in line, line
    assert out.stderr.count("error:") == 1
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, "the checkpoints written before the disk filled up"
    subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
    out = _main(workdir, synthetic_data_dir, "--config.train.stop_at_step=" + str(max(steps) + 2))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {max(steps)}" in (workdir / "train.log").read_text()
  finally:
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_export_into_a_read_only_folder_stops_before_loading_the_model(tmp_path):
  """A read-only filesystem (root writes into any chmod-ed folder); the checkpoint named does
  not exist, so the sentence shows which check came first."""
  folder = tmp_path / "read_only"
  folder.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], check=True)
  try:
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", "qaconv_gs",
                          "--mode=export", f"--workdir={tmp_path / 'run'}",
                          f"--checkpoint={tmp_path / 'no_such_run'}", f"--output={folder}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
  finally:
    subprocess.run(["umount", str(folder)], capture_output=True)
  assert _one_sentence(out) == (f"error: cannot write to {folder} (Read-only file system); pass "
                                "a folder you can write to.")


@pytest.mark.parametrize("site,after", [("tensorboard", 3), ("log", 3), ("checkpoint", 2),
                                        ("results", 1)])
def test_a_write_that_fails_is_one_sentence_and_cleanup_never_replaces_it(
    synthetic_data_dir, tmp_path, site, after):
  """ENOSPC injected at each write site (tests/faulty_main.py); the results file is written
  after the final evaluation, so that case runs the whole tiny epoch."""
  env = {**os.environ, "JAXREID_ENOSPC": site, "JAXREID_ENOSPC_AFTER": str(after)}
  stop = {} if site == "results" else {"train.stop_at_step": 8}
  overrides = {"dataset.data_dir": synthetic_data_dir, **TINY, **stop}
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "faulty_main.py"), "--config",
                        "configs/qaconv_gs.py", f"--workdir={tmp_path}",
                        "--compilation_cache=~/.cache/jaxreid/xla-tests",
                        *(f"--config.{k}={v}" for k, v in overrides.items())],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
  if site == "log":        # train.log is auxiliary: its lines are dropped, the run goes on
    assert out.returncode == 0 and "Logging error" not in out.stderr, out.stderr[-3000:]
    return
  line = _one_sentence(out)
  assert "No space left on device" in line, line
  assert out.stderr.count("error:") == 1
  if site == "results":
    assert f"could not write {tmp_path / 'results.json'}" in line
    assert any((tmp_path / "best").glob("[0-9]*"))     # the trained model is kept


def test_16_bit_grey_pngs_are_scaled_not_clipped(tmp_path):
  import numpy as np
  from PIL import Image
  from jaxreid.tools import load_images
  grey = (np.arange(64 * 32).reshape(64, 32) * 32).astype(np.uint16)     # 0 … 65,504
  path = tmp_path / "grey16.png"
  Image.fromarray(grey).save(path)
  with Image.open(path) as image:
    assert image.mode.startswith("I")                                   # read as 16-bit
  (out,) = load_images([path], (64, 32))
  np.testing.assert_array_equal(out[..., 0], np.rint(grey / 257.0).astype(np.uint8))
  assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
  assert 0 < (out[..., 0] == 255).mean() < 0.01       # Pillow's convert("RGB") whitened 99 %
