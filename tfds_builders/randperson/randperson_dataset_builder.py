"""TFDS builder of RandPerson's training subset (synthetic people; train split only)."""
import pathlib
import re
import sys

try:
  from tfds_builders import reid_common
except ImportError:  # `tfds build` imports this file with only tfds_builders/ on sys.path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import reid_common

FPS = 24.0
# Per scene (11 scenes, 19 cameras): the first global camera index and the frame offset that
# puts the scenes' videos one after another, the values of the authors' loader (QAConv repo).
SCENE_CAMERA_OFFSETS = (0, 2, 4, 6, 8, 9, 10, 12, 13, 14, 15)
SCENE_FRAME_OFFSETS = (0, 160000, 340000, 490000, 640000, 1070000, 1330000, 1590000, 1890000,
                       3190000, 3490000)
FOLDER = "randperson_subset"
# 000000_s00_c00_f000264.jpg: pid, scene, camera in the scene, frame. The RandPerson README
# writes the camera first (000000_c00_s00_...); both orders are read by their letters.
NAME = re.compile(r"(\d+)_(?:s(\d+)_c(\d+)|c(\d+)_s(\d+))_f(\d+)\.jpg")
LAYOUT = """\
randperson_subset/                (from randperson_subset.zip; in the manual dir or a
  randperson_subset/              sub-folder named like "randperson"; the inner folder
    000000_s00_c00_f000264.jpg    is optional) <pid>_s<scene>_c<camera>_f<frame>.jpg"""


def parse(path: pathlib.Path) -> tuple[int, int, float]:
  """(pid, global camera, seconds) of a RandPerson file."""
  m = reid_common.parse_name(NAME, path, "000000_s00_c00_f000264.jpg")
  pid, frame = int(m[1]), int(m[6])
  scene, camera = (int(m[2]), int(m[3])) if m[2] is not None else (int(m[5]), int(m[4]))
  if scene >= len(SCENE_CAMERA_OFFSETS):
    raise ValueError(f"Cannot parse the file name {path}: scene {scene} does not exist "
                     f"(RandPerson has scenes 0..{len(SCENE_CAMERA_OFFSETS) - 1}).")
  return pid, SCENE_CAMERA_OFFSETS[scene] + camera, (SCENE_FRAME_OFFSETS[scene] + frame) / FPS


class Builder(reid_common.ReidBuilder):
  """RandPerson subset: 8,000 synthetic identities, 19 cameras, frame times at 24 fps."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download randperson_subset.zip (https://github.com/VideoObjectSearch/RandPerson) and "
      "extract it into the manual dir:\n" + LAYOUT)
  LAYOUT = LAYOUT
  HAS_TIME = True
  ENCODING = "jpeg"
  # The subset used for training in the papers (TransMatcher, QAConv-GS): 132,145 images of
  # all 8,000 identities; the full RandPerson has 1,801,816 images.
  COUNTS = (("train", 132145, 8000),)
  HOMEPAGE = "https://github.com/VideoObjectSearch/RandPerson"
  DESCRIPTION = ("RandPerson (Wang et al., ACM MM 2020): synthetic people rendered in game "
                 "scenes; the training subset.")
  CITATION = """@inproceedings{wang2020surpassing,
  title={Surpassing Real-World Source Training Data: Random 3D Characters for Generalizable
         Person Re-Identification},
  author={Wang, Yanan and Liao, Shengcai and Shao, Ling}, booktitle={ACM Multimedia},
  year={2020}}"""

  def _records(self, manual: pathlib.Path) -> dict[str, list[reid_common.Record]]:
    root = reid_common.find_root(manual, name="RandPerson", aliases=("randperson",),
                                 required=[FOLDER], layout=LAYOUT) / FOLDER
    if (root / FOLDER).is_dir():  # the zip's own top folder inside ours
      root = root / FOLDER
    paths = reid_common.list_images(root, LAYOUT, suffixes=(".jpg",))
    if not paths:
      raise FileNotFoundError(f"No .jpg images in {root}. Expected layout:\n{LAYOUT}")
    return {"train": [reid_common.Record(path, *parse(path)) for path in paths]}
