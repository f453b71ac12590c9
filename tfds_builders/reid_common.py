"""What the real re-id TFDS builders share: features, the manual-dir layout search, file-name
parsing, image reading with the bad-image policy, and the official-count check.

A builder lists its records (`Record`: path, pid, camera, time) per split from the manual
download; `ReidBuilder` turns them into examples. Nothing here needs TensorFlow.
"""
import dataclasses
import io
import os
import pathlib
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
import tensorflow_datasets as tfds

SKIP_ENV = "JAXREID_SKIP_BAD_IMAGES"   # "1": skip unreadable images (for `tfds build`)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SEARCH_DEPTH = 3                      # how deep below the manual dir a dataset folder may be


class ReidBuildWarning(UserWarning):
  """A build that differs from the official counts, or an image that was skipped."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a split: its file, original person id, 0-based camera, time in seconds."""
  path: pathlib.Path
  pid: int
  camera: int
  time: float | None = None


@dataclasses.dataclass
class ReidConfig(tfds.core.BuilderConfig):
  """A builder config with its official counts: ((split, images, identities), ...)."""
  counts: tuple = ()


def env_flag(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class ReidBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the manual-download re-id builders.

  Subclasses set LAYOUT (the expected folders, for errors and instructions), HAS_TIME, ENCODING
  ("jpeg"/"png"), COUNTS (or per-config `ReidConfig.counts`) and implement
  `_records(manual_dir) -> {split: [Record]}`. `skip_bad_images=True` (or the environment
  variable JAXREID_SKIP_BAD_IMAGES=1) skips unreadable images, warning about each one;
  otherwise the first one is an error.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  LAYOUT = ""
  HAS_TIME = False
  ENCODING = "jpeg"
  COUNTS: tuple = ()
  HOMEPAGE = ""
  DESCRIPTION = ""
  CITATION = ""

  def __init__(self, *, skip_bad_images: bool | None = None, **kwargs):
    self.skip_bad_images = env_flag(SKIP_ENV) if skip_bad_images is None else skip_bad_images
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(self.ENCODING, self.HAS_TIME),
        supervised_keys=("image", "pid"),
        disable_shuffling=True,   # keep file-name (or list) order
        homepage=self.HOMEPAGE,
        description=self.DESCRIPTION,
        citation=self.CITATION,
    )

  def expected_counts(self) -> dict[str, tuple[int, int]]:
    counts = getattr(self.builder_config, "counts", ()) or self.COUNTS
    return {split: (images, ids) for split, images, ids in counts}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    records = self._records(manual_dir(dl_manager, self.name, self.LAYOUT))
    return {split: self._generate_examples(split, rows) for split, rows in records.items()}

  def _records(self, manual: pathlib.Path) -> dict[str, list[Record]]:
    raise NotImplementedError

  def _generate_examples(self, split: str, records: Sequence[Record]):
    yield from generate(records, dataset=self.info.full_name, split=split,
                        expected=self.expected_counts().get(split), encoding=self.ENCODING,
                        with_time=self.HAS_TIME, skip_bad_images=self.skip_bad_images)


def features(encoding: str, with_time: bool) -> tfds.features.FeaturesDict:
  """image, pid, camera, [time], filename — as in `synthetic_reid`."""
  spec = {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding),
      "pid": np.int32,
      "camera": np.int32,
      "filename": tfds.features.Text(),
  }
  if with_time:
    spec["time"] = np.float32
  return tfds.features.FeaturesDict(spec)


def manual_dir(dl_manager: tfds.download.DownloadManager, name: str,
               layout: str) -> pathlib.Path:
  """The manual directory, or a FileNotFoundError saying where it was looked for."""
  try:
    return pathlib.Path(os.fspath(dl_manager.manual_dir))
  except AssertionError as e:  # TFDS asserts that it exists and is not empty
    where = getattr(dl_manager, "_manual_dir", None)
    raise FileNotFoundError(
        f"The manual directory {where} for {name} does not exist or is empty: download the "
        f"archive, extract it there and pass its directory as manual_dir. Expected layout:\n"
        f"{layout}") from e


def find_root(manual: pathlib.Path, *, name: str, aliases: Sequence[str],
              required: Sequence[str], layout: str) -> pathlib.Path:
  """The folder under `manual` (itself, or one up to 3 levels down whose path names one of
  `aliases`, e.g. "market") that holds the `required` entries.

  The candidate holding most of them wins (ties: the shallowest); a FileNotFoundError names
  the first missing entry, or says that nothing of the dataset was found.
  """
  best, best_score = None, 0
  for folder in _candidates(manual, [a.lower() for a in aliases]):
    score = sum((folder / entry).exists() for entry in required)
    if score > best_score:
      best, best_score = folder, score
  if best is None:
    raise FileNotFoundError(
        f"No {name} found under {manual} (looked for {', '.join(required)} in it and in "
        f"sub-folders named like {' / '.join(aliases)}). Expected layout:\n{layout}")
  for entry in required:
    if not (best / entry).exists():
      raise FileNotFoundError(f"{best / entry} is missing ({name}). Expected layout:\n{layout}")
  return best


def _candidates(manual: pathlib.Path, aliases: list[str]) -> Iterator[pathlib.Path]:
  """`manual`, then its folders (breadth first, sorted) whose relative path names an alias."""
  level = [manual]
  for depth in range(_SEARCH_DEPTH + 1):
    next_level = []
    for folder in level:
      rel = folder.relative_to(manual).as_posix().lower()
      if depth == 0 or any(a in rel for a in aliases):
        yield folder
      if depth < _SEARCH_DEPTH:
        next_level += sorted(p for p in _subfolders(folder))
    level = next_level


def _subfolders(folder: pathlib.Path) -> Iterator[pathlib.Path]:
  """Sub-folders, skipping image folders (recognised by their first entries) to stay fast."""
  try:
    with os.scandir(folder) as it:
      for i, entry in enumerate(it):
        if i >= 64 and not entry.is_dir():   # a folder of images: nothing to find inside
          return
        if entry.is_dir() and not entry.name.startswith("."):
          yield pathlib.Path(entry.path)
  except OSError:
    return


def list_images(folder: pathlib.Path, layout: str, suffixes=IMAGE_SUFFIXES) -> list[pathlib.Path]:
  """The image files directly in `folder`, sorted by name (Thumbs.db and the like ignored)."""
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is missing or not a folder. Expected layout:\n{layout}")
  with os.scandir(folder) as it:
    names = [e.name for e in it if e.name.lower().endswith(suffixes) and not e.is_dir()]
  return [folder / n for n in sorted(names)]


def parse_name(pattern: re.Pattern, path: pathlib.Path, example: str) -> re.Match:
  """The full match of `pattern` on the file name, or a ValueError naming the file."""
  match = pattern.fullmatch(path.name)
  if match is None:
    raise ValueError(f"Cannot parse the file name {path}: expected names like {example!r} "
                     f"(pattern {pattern.pattern}).")
  return match


def read_list(path: pathlib.Path, layout: str) -> list[tuple[str, int]]:
  """(relative image path, label) per line of an MSMT17-style list file "path label"."""
  if not path.is_file():
    raise FileNotFoundError(f"List file {path} is missing. Expected layout:\n{layout}")
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split()
    if len(fields) != 2 or not re.fullmatch(r"-?\d+", fields[1]):
      raise ValueError(f"Malformed line {number} of {path}: {line.strip()!r}; expected "
                       "'<folder>/<image file> <person id>', e.g. "
                       "'0000/0000_000_01_0303morning_0015_0.jpg 0'.")
    rows.append((fields[0], int(fields[1])))
  return rows


def read_image(path: pathlib.Path, encoding: str) -> bytes:
  """The file's bytes when Pillow decodes them as RGB; other modes are converted (and
  re-encoded). A ValueError names the file when it is missing, unreadable or corrupt."""
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode == "RGB" and image.format.lower() in ("jpeg", "png"):
        return data
      buffer = io.BytesIO()
      image.convert("RGB").save(buffer, format=encoding.upper())
      return buffer.getvalue()
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    raise ValueError(f"Cannot read the image {path}: {e}") from e


def check_counts(dataset: str, split: str, images: int, ids: int,
                 expected: tuple[int, int] | None) -> str | None:
  """Warns (and returns the message) when a split differs from its official counts."""
  if expected is None or (images, ids) == tuple(expected):
    return None
  message = (f"{dataset} split {split!r} has {images} images of {ids} identities; the official "
             f"{split} split has {expected[0]} images of {expected[1]} identities.")
  warnings.warn(message, ReidBuildWarning, stacklevel=2)
  return message


def generate(records: Iterable[Record], *, dataset: str, split: str,
             expected: tuple[int, int] | None, encoding: str, with_time: bool,
             skip_bad_images: bool) -> Iterator[tuple[int, dict]]:
  """(key, example) per record in order; then the count check. An unreadable image is an
  error, or with `skip_bad_images` a warning naming it (and a summary at the end)."""
  pids, skipped, n = set(), [], 0
  for record in records:
    try:
      image = read_image(record.path, encoding)
    except ValueError as e:
      if not skip_bad_images:
        raise ValueError(f"{e} ({dataset}, split {split!r}). Replace the file, or build with "
                         f"skip_bad_images=True ({SKIP_ENV}=1) to skip it.") from e
      skipped.append(record.path)
      warnings.warn(f"Skipped {record.path} ({dataset}, split {split!r}): {e}",
                    ReidBuildWarning, stacklevel=2)
      continue
    example = {"image": image, "pid": record.pid, "camera": record.camera,
               "filename": record.path.name}
    if with_time:
      example["time"] = np.float32(record.time)
    pids.add(record.pid)
    n += 1
    yield n - 1, example
  if skipped:
    warnings.warn(f"{dataset} split {split!r}: skipped {len(skipped)} unreadable image(s): "
                  + ", ".join(str(p) for p in skipped), ReidBuildWarning, stacklevel=2)
  check_counts(dataset, split, n, len(pids), expected)
