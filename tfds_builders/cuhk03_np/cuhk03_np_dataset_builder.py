"""TFDS builder of CUHK03-NP (767/700 protocol of Zhong et al.), configs detected and labeled."""
import pathlib
import re
import sys

try:
  from tfds_builders import reid_common
except ImportError:  # `tfds build` imports this file with only tfds_builders/ on sys.path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import reid_common

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
NAME = re.compile(r"(\d+)_c(\d+)_(\d+)\.png")   # 0003_c1_22.png: pid, camera, image index
LAYOUT = """\
cuhk03-np/                        (the CUHK03-NP archive; this folder, or the manual dir itself,
  detected/                       or a sub-folder named like "cuhk03")
    bounding_box_train/
      0003_c1_22.png              <pid>_c<camera>_<index>.png
    query/
    bounding_box_test/
  labeled/                        (same three folders)"""


class Builder(reid_common.ReidBuilder):
  """CUHK03-NP: 1,467 identities, 2 cameras per identity; no frame times."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download CUHK03-NP (https://github.com/zhunzhong07/person-re-ranking/tree/master/"
      "CUHK03-NP) and extract it into the manual dir:\n" + LAYOUT)
  LAYOUT = LAYOUT
  HAS_TIME = False
  ENCODING = "png"
  BUILDER_CONFIGS = [
      reid_common.ReidConfig(
          name="detected", description="Boxes found by a person detector (DPM).",
          counts=(("train", 7365, 767), ("query", 1400, 700), ("gallery", 5332, 700))),
      reid_common.ReidConfig(
          name="labeled", description="Hand-drawn boxes.",
          counts=(("train", 7368, 767), ("query", 1400, 700), ("gallery", 5328, 700))),
  ]
  HOMEPAGE = "https://github.com/zhunzhong07/person-re-ranking/tree/master/CUHK03-NP"
  DESCRIPTION = ("CUHK03 (Li et al., CVPR 2014) in the new protocol of Zhong et al. "
                 "(CVPR 2017): 767 training and 700 test identities.")
  CITATION = """@inproceedings{zhong2017re,
  title={Re-ranking Person Re-identification with k-reciprocal Encoding},
  author={Zhong, Zhun and Zheng, Liang and Cao, Donglin and Li, Shaozi}, booktitle={CVPR},
  year={2017}}"""

  def _records(self, manual: pathlib.Path) -> dict[str, list[reid_common.Record]]:
    subset = self.builder_config.name
    root = reid_common.find_root(
        manual, name=f"CUHK03-NP {subset}", aliases=("cuhk03",),
        required=[f"{subset}/{folder}" for folder in SPLIT_FOLDERS.values()],
        layout=LAYOUT) / subset
    records = {}
    for split, folder in SPLIT_FOLDERS.items():
      rows = []
      for path in reid_common.list_images(root / folder, LAYOUT):
        pid, camera, _ = map(int, reid_common.parse_name(NAME, path, "0003_c1_22.png").groups())
        rows.append(reid_common.Record(path, pid, camera - 1))
      records[split] = rows
    return records
