"""Fault paths of a training run (issue "Nothing lost, nothing silent"): a diverging run stops
before saving a broken state, and rerunning a finished run keeps its results."""
import json

import jax
import numpy as np
import pytest

from configs import qaconv_gs
from jaxreid.checkpoint import restore_for_eval
from jaxreid.registry import train_and_evaluate
from jaxreid.train.loop import TrainingDiverged
from training import tiny


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(synthetic_data_dir, tmp_path):
  # An infinite lr turns the weights non-finite in the first step (its loss is still finite).
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1, lr=float("inf"),
                clip_norm=0.0)
  config.train.update(log_every_steps=1, checkpoint_every_steps=1)
  with pytest.raises(TrainingDiverged, match=r"training diverged at step 1: param_norm (nan|inf);"
                                             r".*lower train.lr or set train.clip_norm"):
    train_and_evaluate(config, tmp_path)
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))   # nothing broken was saved
  assert not (tmp_path / "results.json").exists()


def test_a_run_that_diverges_later_keeps_its_good_checkpoints(synthetic_data_dir, tmp_path):
  """Checkpoints before the divergence stay, all finite; resuming diverges at the same step."""
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  config.train.update(log_every_steps=1, checkpoint_every_steps=2, stop_at_step=2)
  train_and_evaluate(config, tmp_path)                     # 2 good steps, checkpointed
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1, lr=float("inf"),
                clip_norm=0.0)
  config.train.update(log_every_steps=1, checkpoint_every_steps=2)
  with pytest.raises(TrainingDiverged, match="training diverged at step 3: param_norm"):
    train_and_evaluate(config, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*"))
  assert steps == [2]
  _, variables = restore_for_eval(str(tmp_path / "checkpoints" / "2"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_rerunning_a_finished_run_keeps_its_results(synthetic_data_dir, tmp_path):
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  first = train_and_evaluate(config, tmp_path)
  written = (tmp_path / "results.json").read_text()
  assert first["test"] and json.loads(written)["test"] == first["test"]
  again = train_and_evaluate(tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1),
                             tmp_path)
  assert again["test"] == first["test"]
  assert (tmp_path / "results.json").read_text() == written
  # Killed after the last checkpoint but before its results were written: it evaluates.
  (tmp_path / "results.json").unlink()
  third = train_and_evaluate(tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1),
                             tmp_path)
  metrics = lambda r: {name: {k: v for k, v in m.items() if k != "seconds"}
                       for name, m in r["test"].items()}
  assert metrics(third) == metrics(first)
  assert metrics(json.loads((tmp_path / "results.json").read_text())) == metrics(first)
