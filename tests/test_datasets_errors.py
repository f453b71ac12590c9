"""Bad manual downloads: each is a clear error naming the path and the expected layout."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

import reid_dummy
from jaxreid.data import datasets
from tfds_builders import reid_common
from tfds_builders.market1501 import market1501_dataset_builder as market_lib

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::tfds_builders.reid_common.ReidBuildWarning")


def prepare(name, manual, data_dir, config=None, **kwargs):
  return datasets.prepare(name, data_dir=str(data_dir), config=config, manual_dir=str(manual),
                          **kwargs)


@pytest.fixture
def market(tmp_path):
  reid_dummy.write_market1501(tmp_path / "manual")
  return tmp_path / "manual", tmp_path / "manual" / "Market-1501-v15.09.15"


def test_manual_dir_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))) as e:
    prepare("market1501", tmp_path / "nowhere", tmp_path / "tfds")
  assert "bounding_box_train" in str(e.value)        # the expected layout
  # The same through the builder alone (what `tfds build` runs).
  builder = market_lib.Builder(data_dir=str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="does not exist or is empty") as e:
    builder.download_and_prepare(file_format="array_record", download_config=(
        tfds.download.DownloadConfig(manual_dir=str(tmp_path / "nowhere"))))
  assert str(tmp_path / "nowhere") in str(e.value) and "bounding_box_train" in str(e.value)


def test_not_prepared_without_manual_dir_says_how_to_build(tmp_path):
  with pytest.raises(FileNotFoundError, match="--mode=build") as e:
    datasets.load_split("dukemtmc_reid", "query", data_dir=str(tmp_path))
  assert "manual_dir" in str(e.value) and "tfds build tfds_builders/dukemtmc_reid" in str(e.value)


def test_dataset_not_found_in_manual_dir(tmp_path):
  reid_dummy.write_dukemtmc_reid(tmp_path / "manual")   # Duke is there, Market is not
  with pytest.raises(FileNotFoundError, match="No Market-1501 found under") as e:
    prepare("market1501", tmp_path / "manual", tmp_path / "tfds")
  assert str(tmp_path / "manual") in str(e.value) and "Market-1501-v15.09.15/" in str(e.value)


def test_split_folder_missing(market, tmp_path):
  manual, root = market
  for path in (root / "query").iterdir():
    path.unlink()
  (root / "query").rmdir()
  with pytest.raises(FileNotFoundError, match=re.escape(f"{root / 'query'} is missing")) as e:
    prepare("market1501", manual, tmp_path / "tfds")
  assert "Expected layout" in str(e.value) and "bounding_box_test/" in str(e.value)


def test_cuhk03_subset_folder_missing(tmp_path):
  reid_dummy.write_cuhk03_np(tmp_path / "manual")
  gallery = tmp_path / "manual" / "cuhk03-np" / "labeled" / "bounding_box_test"
  for path in gallery.iterdir():
    path.unlink()
  gallery.rmdir()
  with pytest.raises(FileNotFoundError, match=re.escape(f"{gallery} is missing")):
    prepare("cuhk03_np", tmp_path / "manual", tmp_path / "tfds", config="labeled")


def test_msmt17_list_file_missing(tmp_path):
  reid_dummy.write_msmt17(tmp_path / "manual")
  missing = tmp_path / "manual" / "MSMT17_V1" / "list_val.txt"
  missing.unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} is missing")) as e:
    prepare("msmt17", tmp_path / "manual", tmp_path / "tfds", config="default")
  assert "list_gallery.txt" in str(e.value)   # the expected layout


def test_msmt17_image_folder_missing(tmp_path):
  reid_dummy.write_msmt17(tmp_path / "manual")
  test_dir = tmp_path / "manual" / "MSMT17_V1" / "test"
  os.rename(test_dir, test_dir.with_name("test_elsewhere"))
  with pytest.raises(FileNotFoundError, match=re.escape(f"{test_dir} is missing")):
    prepare("msmt17", tmp_path / "manual", tmp_path / "tfds", config="default")


def test_msmt17_malformed_list_line(tmp_path):
  reid_dummy.write_msmt17(tmp_path / "manual")
  lst = tmp_path / "manual" / "MSMT17_V1" / "list_query.txt"
  lst.write_text(lst.read_text() + "0001/0001_003_03_0303afternoon_0054_0.jpg\n")
  with pytest.raises(ValueError, match=re.escape(f"Malformed line 3 of {lst}")) as e:
    prepare("msmt17", tmp_path / "manual", tmp_path / "tfds", config="default")
  assert "'<folder>/<image file> <person id>'" in str(e.value)


def test_file_name_that_does_not_parse(market, tmp_path):
  manual, root = market
  bad = root / "bounding_box_train" / "0002_c1_000451_03.jpg"   # no session
  reid_dummy.write_image(bad, 2, 1)
  with pytest.raises(ValueError, match=re.escape(f"Cannot parse the file name {bad}")) as e:
    prepare("market1501", manual, tmp_path / "tfds")
  assert "0002_c1s1_000451_03.jpg" in str(e.value)   # an example of the expected names


def test_randperson_unknown_scene(tmp_path):
  reid_dummy.write_randperson(tmp_path / "manual")
  bad = tmp_path / "manual" / "randperson_subset" / "randperson_subset" / \
      "000001_s11_c00_f000001.jpg"
  reid_dummy.write_image(bad, 1, 0)
  with pytest.raises(ValueError, match=re.escape(f"{bad}: scene 11 does not exist")):
    prepare("randperson", tmp_path / "manual", tmp_path / "tfds")


def _corrupt(market):
  manual, root = market
  bad = sorted((root / "query").glob("*.jpg"))[1]
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  return manual, bad


def test_corrupt_image_is_an_error_by_default(market, tmp_path):
  manual, bad = _corrupt(market)
  with pytest.raises(ValueError, match=re.escape(f"Cannot read the image {bad}")) as e:
    prepare("market1501", manual, tmp_path / "tfds")
  assert "skip_bad_images" in str(e.value)
  assert not (tmp_path / "tfds" / "market1501" / "1.0.0" / "dataset_info.json").exists()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_corrupt_image_skipped_on_request(market, tmp_path, monkeypatch, how):
  manual, bad = _corrupt(market)
  kwargs = {"skip_bad_images": True} if how == "argument" else {}
  if how == "environment":    # what `tfds build` users set
    monkeypatch.setenv(reid_common.SKIP_ENV, "1")
    kwargs = {}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if how == "environment":
      builder = market_lib.Builder(data_dir=str(tmp_path / "tfds"))
      builder.download_and_prepare(file_format="array_record", download_config=(
          tfds.download.DownloadConfig(manual_dir=str(manual))))
    else:
      prepare("market1501", manual, tmp_path / "tfds", **kwargs)
  messages = [str(w.message) for w in caught]
  assert any(m.startswith(f"Skipped {bad}") for m in messages), messages
  assert any("skipped 1 unreadable image(s)" in m and str(bad) in m for m in messages)
  query = datasets.load_split("market1501", "query", data_dir=str(tmp_path / "tfds"))
  assert bad.name not in query.filenames and len(query) == 5


def test_build_mode_on_the_command_line(tmp_path):
  """`main.py --mode=build` builds the train and test sets from dataset.manual_dir."""
  reid_dummy.write_market1501(tmp_path / "manual")
  reid_dummy.write_dukemtmc_reid(tmp_path / "manual")
  out = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/qaconv_gs.py", "--mode=build",
       "--config.dataset.train=market1501", "--config.dataset.test=market1501,dukemtmc_reid",
       f"--config.dataset.data_dir={tmp_path / 'tfds'}",
       f"--config.dataset.manual_dir={tmp_path / 'manual'}", f"--workdir={tmp_path / 'w'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "market1501/1.0.0: train 36, query 6, gallery 22 images" in out.stdout
  assert "dukemtmc_reid/1.0.0: train 16, query 4, gallery 7 images" in out.stdout
  assert "the official train split has 12936 images of 751 identities" in out.stderr
  out = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/qaconv_gs.py", "--mode=build",
       "--config.dataset.train=cuhk03_np/detected", f"--config.dataset.data_dir={tmp_path}",
       f"--config.dataset.manual_dir={tmp_path / 'manual'}", f"--workdir={tmp_path / 'w'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "error: No CUHK03-NP detected found under" in out.stderr
