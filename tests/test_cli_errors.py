"""Bad input at the command line and in the API: one clear error sentence each."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxreid

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_unknown_config_key_is_one_sentence():
  out = run_main("--config", "configs/qaconv_gs.py", "--config.train.learning_rte=0.1")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: --config.train.learning_rte names a field 'learning_rte' that the config does not "
      "have. Check the field names in the config file."]


def test_unknown_config_setting_names_the_choices():
  out = run_main("--config", "configs/qaconv_gs.py:nope")
  assert out.returncode == 2
  assert "has no setting 'nope'" in out.stderr and "Traceback" not in out.stderr


def test_eval_with_missing_checkpoint(tmp_path):
  out = run_main("--config", "configs/qaconv_gs.py", "--mode=eval",
                 f"--checkpoint={tmp_path / 'nowhere'}", f"--workdir={tmp_path}")
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "nowhere" in last and "does not exist" in last


def test_checkpoint_of_another_method(tmp_path):
  import torch
  state = {"model": {"base.conv1.weight": torch.zeros(4, 3, 7, 7)},
           "criterion": {"matcher.decoder.layers.0.fc1.weight": torch.zeros(8, 8)}}
  path = tmp_path / "transmatcher.pth.tar"
  torch.save(state, path)
  with pytest.raises(ValueError, match="transmatcher"):
    jaxreid.load("qaconv", str(path))


def test_wrong_image_size(synthetic_data_dir, tmp_path):
  from configs import qaconv_gs
  from jaxreid.checkpoint import Checkpointer
  from jaxreid.models import init_variables
  from jaxreid.registry import build_model
  import jax
  config = qaconv_gs.get_config()
  config.model.update(depth=18, width=8, neck=16)
  model = build_model(config)
  v = init_variables(model, jax.random.key(0), 64, 32)

  class State:  # what Checkpointer.save_best reads
    step, params, batch_stats = np.int32(1), v["params"], v["batch_stats"]
  ckpt = Checkpointer(tmp_path)
  ckpt.save_best(State, config, {"mAP": 0.5})
  ckpt.wait()
  loaded = jaxreid.load("qaconv_gs", str(tmp_path))
  assert loaded.encode(np.zeros((2, 64, 32, 3), np.uint8)).shape == (2, 4, 2, 16)
  with pytest.raises(ValueError, match=r"expected images of 64×32, got 128×64"):
    loaded.encode(np.zeros((2, 128, 64, 3), np.uint8))
