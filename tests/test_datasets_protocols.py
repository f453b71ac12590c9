"""Protocols: multi-source training sets, and train on one dataset → several test sets, each
reported separately, end to end on stand-in archives."""
import json

import numpy as np
import pytest

import reid_dummy
from jaxreid.data import datasets

pytestmark = pytest.mark.filterwarnings("ignore::tfds_builders.reid_common.ReidBuildWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Market-1501 and DukeMTMC-reID stand-ins built (array_record) from one manual dir."""
  manual = tmp_path_factory.mktemp("manual")
  reid_dummy.write_market1501(manual)
  reid_dummy.write_dukemtmc_reid(manual)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for name in ("market1501", "dukemtmc_reid"):
    datasets.prepare(name, data_dir=data_dir, manual_dir=str(manual))
  return data_dir


def test_multi_source_train_relabels_per_source(data_dir):
  market = datasets.load_split("market1501", "train", data_dir=data_dir)
  duke = datasets.load_split("dukemtmc_reid", "train", data_dir=data_dir)
  both = datasets.load_train("market1501, dukemtmc_reid", data_dir=data_dir)
  n = len(market)
  assert len(both) == n + len(duke) == len(both.source)
  assert both.num_classes == market.num_classes + duke.num_classes
  np.testing.assert_array_equal(both.labels, np.r_[market.labels, duke.labels + market.num_classes])
  np.testing.assert_array_equal(both.pids, np.r_[market.pids, duke.pids])   # original ids
  np.testing.assert_array_equal(both.domains, np.r_[np.zeros(n), np.ones(len(duke))])
  np.testing.assert_array_equal(both.cams, np.r_[market.cams, duke.cams])
  np.testing.assert_allclose(both.times, np.r_[market.times, duke.times])
  assert both.filenames == market.filenames + duke.filenames
  for i in (0, n - 1, n, len(both) - 1):   # rows on both sides of the boundary
    assert both.source[i]["filename"] == both.filenames[i]
  with pytest.raises(IndexError):
    both.source[len(both)]
  assert both.name == "market1501:train+dukemtmc_reid:train"
  # Shared pid values (Market and Duke both have small ids) stay different classes.
  assert len(set(both.labels[:n]) & set(both.labels[n:])) == 0
  single = datasets.load_train("market1501", data_dir=data_dir)
  np.testing.assert_array_equal(single.domains, np.zeros(len(single), np.int32))
  with pytest.raises(ValueError, match="names a dataset twice"):
    datasets.load_train("market1501,market1501", data_dir=data_dir)


def test_train_market_test_market_and_duke_end_to_end(data_dir, tmp_path):
  """dataset.train=market1501, dataset.test=market1501,dukemtmc_reid: each test set is
  evaluated and reported separately in results.json."""
  from configs import qaconv_gs
  from training import tiny
  from jaxreid.registry import train_and_evaluate
  config = tiny(qaconv_gs.get_config(), data_dir, epochs=1)
  config.dataset.train = "market1501"
  config.dataset.test = "market1501,dukemtmc_reid"
  results = train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert list(saved["test"]) == ["market1501", "dukemtmc_reid"]
  for name, r in saved["test"].items():
    assert 0 <= r["mAP"] <= 1 or 0 <= r["mAP"] <= 100, (name, r)
    assert r == results["test"][name]
  assert saved["test"]["market1501"] != saved["test"]["dukemtmc_reid"]
