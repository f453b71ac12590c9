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
      "have; check the field names in the config file."]


def test_unknown_config_setting_names_the_choices():
  out = run_main("--config", "configs/qaconv_gs.py:nope")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: configs/qaconv_gs.py has no setting 'nope'; use synthetic or one of market, "
      "msmt17_all, market_v20, msmt17_all_v20."]


@pytest.mark.parametrize("flag", [["--config", "configs/doesnotexist.py"],
                                  ["--config=configs/doesnotexist.py:market"]])
def test_missing_config_file_is_one_sentence(flag):
  out = run_main(*flag)
  assert out.returncode == 2
  (line,) = out.stderr.strip().splitlines()
  assert line.startswith("error: config file configs/doesnotexist.py does not exist; give a "
                         "config file or one of the configs shipped with jaxreid by name: ")
  assert "transmatcher, " in line, line


def test_config_by_name_or_shipped_path_from_any_folder(tmp_path):
  """`--config qaconv_gs:nope` names the shipped file; so does configs/… run from elsewhere."""
  for spec, cwd in (("qaconv_gs:nope", ROOT), ("configs/qaconv_gs.py:nope", tmp_path)):
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", spec], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: configs/qaconv_gs.py has no setting 'nope'"), out.stderr[-500:]


def test_wrong_value_type_is_one_sentence_without_field_advice():
  out = run_main("--config", "configs/qaconv_gs.py", "--config.train.lr=fast")
  assert out.returncode == 2
  (line,) = out.stderr.strip().splitlines()
  assert "--config.train.lr=fast" in line and "float" in line and "field names" not in line


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
  nan_images = np.full((2, 64, 32, 3), 0.5, np.float32)
  nan_images[1, 3, 4, 0] = np.nan
  with pytest.raises(ValueError, match=r"images contain NaN \(1 values\)"):
    loaded.encode(nan_images)


def test_match_refuses_maps_that_are_not_this_models_features():
  import jax
  from configs import qaconv_gs
  from jaxreid.api import ReidModel
  from jaxreid.models import init_variables
  from jaxreid.registry import build_model
  config = qaconv_gs.get_config()
  config.model.update(depth=18, width=8, neck=16)
  config.data.update(height=64, width=32)
  model = ReidModel(config, init_variables(build_model(config), jax.random.key(0), 64, 32))
  maps = model.encode(np.random.default_rng(0).integers(0, 256, (2, 64, 32, 3), np.uint8))
  assert maps.shape == (2, 4, 2, 16) and np.isfinite(model.match(maps, maps)).all()
  shape = r"must be this model's features \[N, 4, 2, 16\] from encode\(\); got shape"
  with pytest.raises(ValueError, match=rf"probe_maps {shape} \(2, 4, 2, 8\)\."):
    model.match(maps[..., :8], maps[..., :8])          # half the channels on both sides
  with pytest.raises(ValueError, match=rf"gallery_maps {shape} \(2, 4, 2, 8\)\."):
    model.match(maps, maps[..., :8])
  broken = maps.copy()
  broken[0, 1, 1, 3], broken[1, 0, 0, 0] = np.nan, np.inf
  with pytest.raises(ValueError, match=r"^gallery_maps hold 2 NaN or infinite values; pass the "
                                       r"finite features encode\(\) gives\.$"):
    model.match(maps, broken)


def test_post_processing_rejects_what_has_no_meaning():
  """NaN scores have no rank; TLift lifts similarities in [0, 1]; λ lies in [0, 1]."""
  rng = np.random.default_rng(0)
  scores = rng.random((5, 7))
  scores[2, 3] = np.nan
  ids, cams = np.arange(7) % 5, np.ones(7)
  with pytest.raises(ValueError, match=r"NaN \(first in query row 2\)"):
    jaxreid.top_k(scores, 3)
  with pytest.raises(ValueError, match=r"NaN \(first in query row 2\)"):
    jaxreid.evaluate_ranking(scores, np.arange(5), ids, np.zeros(5), cams)
  times_g, times_q = np.arange(7.0), np.arange(5.0)
  with pytest.raises(ValueError, match=r"\[0, 1\].*and NaN"):
    jaxreid.tlift(scores, np.zeros(7), times_g, np.zeros(5), times_q)
  with pytest.raises(ValueError, match=r"got values in \[.*, 1.9"):
    jaxreid.tlift(np.where(np.isnan(scores), 1.95, scores), np.zeros(7), times_g, np.zeros(5),
                  times_q)
  distances = rng.random((5, 7)), rng.random((5, 5)), rng.random((7, 7))
  with pytest.raises(ValueError, match="lambda_value .* must lie in \\[0, 1\\]; got 1.5"):
    jaxreid.rerank(*distances, lambda_value=1.5)
  with pytest.raises(ValueError, match="contain NaN"):
    jaxreid.rerank(scores, *distances[1:])
  # What is valid still works: a similarity of exactly 0 or 1, and λ at its ends.
  assert np.isfinite(jaxreid.tlift(np.clip(np.nan_to_num(scores), 0, 1), np.zeros(7), times_g,
                                   np.zeros(5), times_q)).all()
  assert jaxreid.rerank(*distances, lambda_value=1.0).shape == (5, 7)


def test_workdir_that_is_a_file_stops_before_any_work(tmp_path):
  target = tmp_path / "results"
  target.write_text("not a folder")
  out = run_main("--config", "configs/qaconv_gs.py", f"--workdir={target}")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: --workdir {target} is a file, not a folder; pass a folder.")
  assert target.read_text() == "not a folder"


def test_eval_into_a_new_workdir_creates_it_first(tmp_path):
  """--mode=eval with a workdir that does not exist yet: the folder is made before evaluating
  (the missing checkpoint is then the only error)."""
  new = tmp_path / "a" / "b"
  out = run_main("--config", "configs/qaconv_gs.py", "--mode=eval", f"--workdir={new}",
                 f"--checkpoint={tmp_path / 'nowhere'}")
  assert out.returncode == 2 and new.is_dir()
  assert "nowhere" in out.stderr.strip().splitlines()[-1]
