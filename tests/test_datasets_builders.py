"""The real-dataset TFDS builders on stand-in archives: every field, the splits, the counts."""
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
from PIL import Image
import pytest

import reid_dummy
from jaxreid.data import datasets
from tfds_builders import reid_common
from tfds_builders.dukemtmc_reid import dukemtmc_reid_dataset_builder as duke_lib
from tfds_builders.market1501 import market1501_dataset_builder as market_lib
from tfds_builders.randperson import randperson_dataset_builder as randperson_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILDERS = {"market1501": ("market1501", []), "dukemtmc_reid": ("dukemtmc_reid", []),
            "cuhk03_np": ("cuhk03_np", ["detected", "labeled"]),
            "msmt17": ("msmt17", ["default", "all"]), "randperson": ("randperson", [])}
FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def build(name, manual, data_dir, config=None, **kwargs):
  """Builds and returns the count warnings (and any other build warnings) as strings."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    datasets.prepare(name, data_dir=str(data_dir), config=config, manual_dir=str(manual),
                     **kwargs)
  return [str(w.message) for w in caught if issubclass(w.category, reid_common.ReidBuildWarning)]


def check_split(split, expected, folder, *, times=None):
  """Rows equal `expected` [(file name, pid, camera)] in order; images equal the files (found
  under `folder`, the split's folder)."""
  assert [(f, int(p), int(c)) for f, p, c in zip(split.filenames, split.pids, split.cams)] \
      == expected
  assert split.pids.dtype == np.int32 and split.cams.dtype == np.int32
  for i in range(len(split)):
    row = split.source[i]
    assert row["filename"] == expected[i][0]
    assert int(row["pid"]) == expected[i][1] and int(row["camera"]) == expected[i][2]
    (path,) = folder.rglob(expected[i][0])
    with Image.open(path) as image:
      np.testing.assert_array_equal(row["image"], np.asarray(image.convert("RGB")))
  if times is None:
    assert "time" not in split.source[0] and np.isnan(split.times).all()
  else:
    np.testing.assert_allclose(split.times, times, rtol=1e-6)
    np.testing.assert_allclose([split.source[i]["time"] for i in range(len(split))], times,
                               rtol=1e-6)


def count_warnings(messages, dataset, expected_counts, built):
  """One warning per split, naming the split, the built and the official numbers."""
  assert len(messages) == len(built), messages
  for split, rows in built.items():
    images, ids = expected_counts[split]
    (message,) = [m for m in messages if f"split {split!r}" in m]
    assert dataset in message
    assert f"{len(rows)} images of {len({p for _, p, _ in rows})} identities" in message
    assert f"{images} images of {ids} identities" in message


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
  root = tmp_path_factory.mktemp("manual")
  return root, {
      "market1501": reid_dummy.write_market1501(root),
      "dukemtmc_reid": reid_dummy.write_dukemtmc_reid(root),
      "cuhk03_np": reid_dummy.write_cuhk03_np(root),
      "msmt17": reid_dummy.write_msmt17(root),
      "randperson": reid_dummy.write_randperson(root),
  }


def market_times(rows_by_split):
  """TLift times written out for the test: per camera, session s>1 is shifted by
  offset_{s-1} + max(frame + offset_{s-1}) over session s-1 of every split (junk excluded)."""
  parse = lambda name: tuple(map(int, re.match(r"\d+_c(\d)s(\d)_(\d+)", name).groups()))
  frames = [parse(n) for rows in rows_by_split.values() for n, _, _ in rows]
  offset = {}
  for cam in {c for c, _, _ in frames}:
    offset[cam, 1] = 0
    for s in range(2, 7):
      prev = [f + offset[cam, s - 1] for c, ss, f in frames if (c, ss) == (cam, s - 1)]
      offset[cam, s] = offset[cam, s - 1] + max(prev, default=0)
  return {split: [(parse(n)[2] + offset[parse(n)[:2]]) / 25 for n, _, _ in rows]
          for split, rows in rows_by_split.items()}


def test_market_session_offsets_count_earlier_offsets_twice():
  offsets = market_lib.session_offsets({(1, 1): 100, (1, 2): 50, (1, 3): 10, (2, 2): 7})
  # s2: 0 + 100; s3: 100 + (50 + 100); s4: 250 + (10 + 250); s5, s6: no images in s4, s5.
  assert [offsets[1, s] for s in range(1, 7)] == [0, 100, 250, 510, 510, 510]
  assert [offsets[2, s] for s in range(1, 7)] == [0, 0, 7, 7, 7, 7]


def test_market1501(manual, tmp_path):
  root, expected = manual[0], manual[1]["market1501"]
  messages = build("market1501", root, tmp_path)
  count_warnings(messages, "market1501", dict((s, (n, i)) for s, n, i in
                                              market_lib.Builder.COUNTS), expected)
  times = market_times(expected)
  for split, folder in FOLDERS.items():
    check_split(datasets.load_split("market1501", split, data_dir=str(tmp_path)),
                expected[split], root / "Market-1501-v15.09.15" / folder, times=times[split])
  gallery = datasets.load_split("market1501", "gallery", data_dir=str(tmp_path))
  assert (gallery.pids == 0).sum() == 4   # distractors are kept
  assert -1 not in gallery.pids   # the junk files exist but are not built
  assert list(root.rglob("-1_c*.jpg"))


def test_dukemtmc_reid(manual, tmp_path):
  root, expected = manual[0], manual[1]["dukemtmc_reid"]
  messages = build("dukemtmc_reid", root, tmp_path)
  count_warnings(messages, "dukemtmc_reid",
                 dict((s, (n, i)) for s, n, i in duke_lib.Builder.COUNTS), expected)
  offsets = [5542, 3606, 27243, 31181, 0, 22401, 18967, 46765]
  for split, rows in expected.items():
    times = [(int(n.split("_f")[1][:-4]) + offsets[c]) / 59.94 for n, _, c in rows]
    check_split(datasets.load_split("dukemtmc_reid", split, data_dir=str(tmp_path)), rows,
                root / "DukeMTMC-reID" / FOLDERS[split], times=times)
  assert 4000 in datasets.load_split("dukemtmc_reid", "gallery", data_dir=str(tmp_path)).pids


@pytest.mark.parametrize("subset,counts", [
    ("detected", {"train": (7365, 767), "query": (1400, 700), "gallery": (5332, 700)}),
    ("labeled", {"train": (7368, 767), "query": (1400, 700), "gallery": (5328, 700)})])
def test_cuhk03_np(manual, tmp_path, subset, counts):
  root, expected = manual[0], manual[1]["cuhk03_np"][subset]
  messages = build("cuhk03_np", root, tmp_path, config=subset)
  count_warnings(messages, f"cuhk03_np/{subset}", counts, expected)
  for split, rows in expected.items():
    check_split(datasets.load_split("cuhk03_np", split, data_dir=str(tmp_path), config=subset),
                rows, root / "cuhk03-np" / subset / FOLDERS[split])


def test_msmt17_default_and_all(manual, tmp_path):
  root, expected = manual[0], manual[1]["msmt17"]
  messages = build("msmt17", root, tmp_path, config="default")
  count_warnings(messages, "msmt17/default", {"train": (32621, 1041), "query": (11659, 3060),
                                               "gallery": (82161, 3060)}, expected)
  for split, rows in expected.items():
    check_split(datasets.load_split("msmt17", split, data_dir=str(tmp_path), config="default"),
                rows, root / "MSMT17_V1" / ("train" if split == "train" else "test"))

  messages = build("msmt17", root, tmp_path, config="all")
  offset = max(p for _, p, _ in expected["train"]) + 1
  everything = expected["train"] + [(n, p + offset, c)
                                    for n, p, c in expected["query"] + expected["gallery"]]
  count_warnings(messages, "msmt17/all", {"train": (126441, 4101)}, {"train": everything})
  train = datasets.load_split("msmt17", "train", data_dir=str(tmp_path), config="all")
  check_split(train, everything, root / "MSMT17_V1")
  assert train.num_classes == len({p for _, p, _ in everything})
  with pytest.raises(ValueError, match="has no split 'query'"):
    datasets.load_split("msmt17", "query", data_dir=str(tmp_path), config="all")


def test_msmt17_v2_folders(tmp_path):
  expected = reid_dummy.write_msmt17(tmp_path / "manual", version="V2")
  build("msmt17", tmp_path / "manual", tmp_path / "tfds", config="default")
  split = datasets.load_split("msmt17", "gallery", data_dir=str(tmp_path / "tfds"),
                              config="default")
  check_split(split, expected["gallery"], tmp_path / "manual" / "MSMT17_V2" / "mask_test_v2")


def test_randperson(manual, tmp_path):
  root, expected = manual[0], manual[1]["randperson"]
  messages = build("randperson", root, tmp_path)
  assert len(messages) == 1 and "132145 images of 8000 identities" in messages[0]
  scene_cams, scene_frames = (0, 2, 4, 6, 8, 9, 10, 12, 13, 14, 15), \
      (0, 160000, 340000, 490000, 640000, 1070000, 1330000, 1590000, 1890000, 3190000, 3490000)
  rows = [(n, p, scene_cams[s] + c) for n, p, (s, c) in expected["train"]]
  times = [(scene_frames[s] + int(n.split("_f")[1][:-4])) / 24 for n, _, (s, _) in
           expected["train"]]
  check_split(datasets.load_split("randperson", "train", data_dir=str(tmp_path)), rows,
              root / "randperson_subset", times=times)
  assert randperson_lib.parse(pathlib.Path("000007_c01_s03_f000010.jpg")) == \
      (7, 6 + 1, (490000 + 10) / 24)   # the README's camera-first order reads the same


@pytest.mark.parametrize("layout", ["manual_is_dataset", "named_subfolder", "not_nested"])
def test_top_level_folder_variants(tmp_path, layout):
  if layout == "manual_is_dataset":   # the manual dir is Market-1501-v15.09.15 itself
    expected = reid_dummy.write_market1501(tmp_path, top="manual")
    name, manual = "market1501", tmp_path / "manual"
  elif layout == "named_subfolder":   # manual/market1501/Market-1501/...
    expected = reid_dummy.write_market1501(tmp_path / "manual", top="market1501/Market-1501")
    name, manual = "market1501", tmp_path / "manual"
  else:                               # randperson_subset/*.jpg without the inner folder
    expected = reid_dummy.write_randperson(tmp_path / "manual", nested=False)
    name, manual = "randperson", tmp_path / "manual"
  build(name, manual, tmp_path / "tfds")
  split = datasets.load_split(name, "train", data_dir=str(tmp_path / "tfds"))
  assert split.filenames == [n for n, _, _ in expected["train"]]


def test_builders_load_the_way_tfds_build_loads_them(manual, tmp_path):
  """`tfds build tfds_builders/<name>` imports `<name>.<name>_dataset_builder` with only
  tfds_builders/ on sys.path and needs exactly one builder class in it; run from elsewhere."""
  script = f"""
import warnings
import tensorflow_datasets as tfds
warnings.simplefilter("ignore")
names = {{}}
for name in {list(BUILDERS)!r}:
  with tfds.core.utils.add_sys_path({str(ROOT / "tfds_builders")!r}):
    cls = tfds.core.community.builder_cls_from_module(f"{{name}}.{{name}}_dataset_builder")
  names[name] = (cls.name, [c.name for c in cls.BUILDER_CONFIGS])
builder = cls(data_dir={str(tmp_path)!r}, file_format="array_record")
builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
    manual_dir={str(manual[0])!r}))
print(names, builder.info.splits["train"].num_examples)
"""
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  built = len(manual[1]["randperson"]["train"])
  assert out.stdout.strip().splitlines()[-1] == f"{BUILDERS} {built}"
