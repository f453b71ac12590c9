"""TFDS builder of MSMT17 (V1 or V2 archive), configs default and all ("MSMT17_all")."""
import pathlib
import re
import sys

try:
  from tfds_builders import reid_common
except ImportError:  # `tfds build` imports this file with only tfds_builders/ on sys.path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import reid_common

LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",),
         "gallery": ("list_gallery.txt",)}
# Image folders of the train and the test lists, per archive version.
VERSIONS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
# 0000_000_01_0303morning_0015_0.jpg: pid, index, camera (01-15), day+time, frame, ...
NAME = re.compile(r"\d+_\d+_(\d+)_.+\.jpg")
LAYOUT = """\
MSMT17_V1/                        (from MSMT17_V1.tar.gz; MSMT17_V2/ with mask_train_v2/ and
  train/                          mask_test_v2/ instead of train/ and test/ also works; this
    0000/                         folder, or the manual dir itself, or a sub-folder named
      0000_000_01_0303morning_0015_0.jpg    like "msmt")
  test/
  list_train.txt                  lines "<folder>/<image file> <person id>", paths relative
  list_val.txt                    to train/ (train, val) or test/ (query, gallery)
  list_query.txt
  list_gallery.txt"""


class Builder(reid_common.ReidBuilder):
  """MSMT17: 4,101 identities, 15 cameras; no frame times. Train = list_train + list_val."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Request MSMT17 from its authors (https://www.pkuvmc.com/dataset.html), then extract "
      "MSMT17_V1.tar.gz (or MSMT17_V2) into the manual dir:\n" + LAYOUT)
  LAYOUT = LAYOUT
  HAS_TIME = False
  ENCODING = "jpeg"
  BUILDER_CONFIGS = [
      reid_common.ReidConfig(
          name="default", description="Official protocol: train = list_train + list_val.",
          counts=(("train", 32621, 1041), ("query", 11659, 3060), ("gallery", 82161, 3060))),
      reid_common.ReidConfig(
          name="all", description="Every image for training (MSMT17_all), test ids offset "
          "past the train ids; train split only.", counts=(("train", 126441, 4101),)),
  ]
  HOMEPAGE = "https://www.pkuvmc.com/dataset.html"
  DESCRIPTION = "MSMT17 person re-identification (Wei et al., CVPR 2018)."
  CITATION = """@inproceedings{wei2018person,
  title={Person Transfer GAN to Bridge Domain Gap for Person Re-Identification},
  author={Wei, Longhui and Zhang, Shiliang and Gao, Wen and Tian, Qi}, booktitle={CVPR},
  year={2018}}"""

  def _records(self, manual: pathlib.Path) -> dict[str, list[reid_common.Record]]:
    lists = [name for names in LISTS.values() for name in names]
    root = reid_common.find_root(manual, name="MSMT17", aliases=("msmt",), required=lists,
                                 layout=LAYOUT)
    train_dir, test_dir = _image_folders(root)
    records = {
        split: [row for name in names
                for row in _list_records(root / name, train_dir if split == "train" else test_dir)]
        for split, names in LISTS.items()}
    if self.builder_config.name == "all":
      offset = max((r.pid for r in records["train"]), default=-1) + 1
      records = {"train": records["train"] + [
          reid_common.Record(r.path, r.pid + offset, r.camera)
          for r in records["query"] + records["gallery"]]}
    return records


def _image_folders(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(train folder, test folder) of the V1 or V2 archive found in `root`."""
  for train, test in VERSIONS.values():
    if (root / train).is_dir() or (root / test).is_dir():
      for folder in (root / train, root / test):
        if not folder.is_dir():
          raise FileNotFoundError(f"{folder} is missing (MSMT17). Expected layout:\n{LAYOUT}")
      return root / train, root / test
  raise FileNotFoundError(f"{root / 'train'} is missing (MSMT17; neither train/ and test/ nor "
                          f"mask_train_v2/ and mask_test_v2/ found). Expected layout:\n{LAYOUT}")


def _list_records(list_file: pathlib.Path, folder: pathlib.Path) -> list[reid_common.Record]:
  """The images of one list file; the camera comes from the file name."""
  rows = []
  for rel, pid in reid_common.read_list(list_file, LAYOUT):
    path = folder / rel
    camera = int(reid_common.parse_name(NAME, path, "0000_000_01_0303morning_0015_0.jpg")[1])
    rows.append(reid_common.Record(path, pid, camera - 1))
  return rows
