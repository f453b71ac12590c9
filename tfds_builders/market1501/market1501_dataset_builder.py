"""TFDS builder of Market-1501 (manual download) with TLift frame times.

`Builder(data_dir=...).download_and_prepare(file_format="array_record",
download_config=tfds.download.DownloadConfig(manual_dir=...))` needs no TensorFlow.
"""
import collections
import pathlib
import re
import sys

try:
  from tfds_builders import reid_common
except ImportError:  # `tfds build` imports this file with only tfds_builders/ on sys.path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from tfds_builders import reid_common

FPS = 25.0
JUNK_PID = -1
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# pid, camera 1-6, session 1-6, frame, bounding box index: 0002_c1s1_000451_03.jpg
NAME = re.compile(r"(-?\d+)_c([1-6])s([1-6])_(\d+)_(\d+)\.jpg")
LAYOUT = """\
Market-1501-v15.09.15/            (from Market-1501-v15.09.15.zip; this folder, or the manual
  bounding_box_train/             dir itself, or a sub-folder named like "market")
    0002_c1s1_000451_03.jpg       <pid>_c<camera>s<session>_<frame>_<box>.jpg
  query/
  bounding_box_test/              (pid -1: junk, dropped; pid 0: distractors, kept)"""


def session_offsets(max_frames: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
  """Frame offset of each (camera, session) from the max frame of each (camera, session).

  TLift's rule (docs/README.md, as in the published TLift numbers): session 1 is unshifted; for
  s = 2..6, offset_s = offset_{s-1} + (largest *already shifted* frame of session s-1, or 0 if
  it has no images), so the earlier offsets are counted twice.
  """
  offsets = {}
  for camera in sorted({c for c, _ in max_frames}):
    offsets[camera, 1] = 0
    for s in range(2, 7):
      prev = offsets[camera, s - 1]
      shifted_max = max_frames[camera, s - 1] + prev if (camera, s - 1) in max_frames else 0
      offsets[camera, s] = prev + shifted_max
  return offsets


def frame_times(parsed: list[tuple[int, int, int]]) -> list[float]:
  """Seconds of each (camera, session, frame), with the session offsets of all of them."""
  max_frames = collections.defaultdict(int)
  for camera, session, frame in parsed:
    max_frames[camera, session] = max(max_frames[camera, session], frame)
  offsets = session_offsets(dict(max_frames))
  return [(frame + offsets[camera, session]) / FPS for camera, session, frame in parsed]


class Builder(reid_common.ReidBuilder):
  """Market-1501: 1,501 identities, 6 cameras; junk dropped, distractors (pid 0) kept."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download Market-1501-v15.09.15.zip (https://zheng-lab-anu.github.io/Project/"
      "project_reid.html) and extract it into the manual dir:\n" + LAYOUT)
  LAYOUT = LAYOUT
  HAS_TIME = True
  ENCODING = "jpeg"
  # Official counts after dropping junk: bounding_box_test holds 19,732 files, of which 3,819
  # are junk (-1); the 15,913 left include 2,793 distractors (pid 0), hence 751 gallery ids.
  COUNTS = (("train", 12936, 751), ("query", 3368, 750), ("gallery", 15913, 751))
  HOMEPAGE = "https://zheng-lab-anu.github.io/Project/project_reid.html"
  DESCRIPTION = "Market-1501 person re-identification (Zheng et al., ICCV 2015)."
  CITATION = """@inproceedings{zheng2015scalable,
  title={Scalable Person Re-identification: A Benchmark},
  author={Zheng, Liang and Shen, Liyue and Tian, Lu and Wang, Shengjin and Wang, Jingdong
          and Tian, Qi},
  booktitle={ICCV}, year={2015}}"""

  def _records(self, manual: pathlib.Path) -> dict[str, list[reid_common.Record]]:
    root = reid_common.find_root(manual, name="Market-1501", aliases=("market",),
                                 required=list(SPLIT_FOLDERS.values()), layout=LAYOUT)
    parsed = {}
    for split, folder in SPLIT_FOLDERS.items():
      rows = []
      for path in reid_common.list_images(root / folder, LAYOUT):
        pid, camera, session, frame, _ = map(
            int, reid_common.parse_name(NAME, path, "0002_c1s1_000451_03.jpg").groups())
        if pid != JUNK_PID:
          rows.append((path, pid, camera, session, frame))
      parsed[split] = rows
    everything = [row for rows in parsed.values() for row in rows]
    times = iter(frame_times([(c, s, f) for _, _, c, s, f in everything]))
    return {split: [reid_common.Record(path, pid, camera - 1, next(times))
                    for path, pid, camera, _, _ in rows]
            for split, rows in parsed.items()}
