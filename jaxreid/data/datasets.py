"""Prepared TFDS re-id splits as random-access sources plus their metadata arrays."""
from collections.abc import Sequence
import dataclasses
import importlib
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

SYNTHETIC = "synthetic_reid"
_JUNK_PID = -1
_METADATA_CHUNK = 2048   # records read at once while collecting metadata (bounds memory)


@dataclasses.dataclass
class ReidSplit:
  """One split. `source[i]` is a dict with the decoded "image" (uint8 HxWx3) and the other features
  of row i; the arrays are aligned with it. `labels` relabels `pids` 0..C-1 in sorted-pid order."""
  source: Sequence[dict]
  pids: np.ndarray
  labels: np.ndarray
  cams: np.ndarray
  times: np.ndarray        # seconds; NaN where the dataset has no times
  filenames: list[str]
  num_classes: int
  name: str

  def __len__(self) -> int:
    return len(self.pids)


class _Rows(Sequence):
  """The rows `keep` of a TFDS data source, with text features as str."""

  def __init__(self, source, keep: np.ndarray):
    self._source, self._keep = source, keep

  def __len__(self) -> int:
    return len(self._keep)

  def __getitem__(self, i: int) -> dict:
    example = dict(self._source[int(self._keep[i])])
    if isinstance(example.get("filename"), bytes):
      example["filename"] = example["filename"].decode("utf-8")
    return example


def _builder_module(name: str):
  """The repo's `tfds_builders/<name>` module (importing it registers the builder), or None."""
  module = f"tfds_builders.{name}.{name}_dataset_builder"
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name is not None and module.startswith(e.name):
      return None
    raise


def _builder(name: str, config, data_dir: str) -> tfds.core.DatasetBuilder:
  module = _builder_module(name)
  if module is not None:
    return module.Builder(config=config, data_dir=data_dir)
  try:  # prepared by a builder that is not in this repo: read it from its files
    return tfds.builder(name if config is None else f"{name}/{config}", data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(_not_prepared(name, config, data_dir)) from e


def _not_prepared(name: str, config, data_dir: str) -> str:
  full = name if config is None else f"{name}/{getattr(config, 'name', config)}"
  return (f"Dataset {full} is not prepared under {data_dir}: build it first, e.g. "
          f"`tfds build tfds_builders/{name} --data_dir={data_dir} --file_format=array_record` "
          f"(real datasets also need their manual download, see the builder's instructions).")


def _metadata(source) -> dict[str, list]:
  """Every feature but the image, read without decoding images."""
  columns = {}
  for start in range(0, len(source), _METADATA_CHUNK):
    keys = list(range(start, min(start + _METADATA_CHUNK, len(source))))
    for example in source.__getitems__(keys):
      for key, value in example.items():
        if key != "image":
          columns.setdefault(key, []).append(value)
  return columns


def relabel(pids: np.ndarray) -> tuple[np.ndarray, int]:
  """Labels 0..C-1 in sorted-pid order, and C."""
  classes, labels = np.unique(pids, return_inverse=True)
  return labels.astype(np.int32).reshape(-1), len(classes)


def parse_specs(specs: str) -> list[tuple[str, str | None]]:
  """"a/x, b" → [("a", "x"), ("b", None)]: dataset names with optional builder configs."""
  out = []
  for spec in str(specs).split(","):
    if spec.strip():
      name, _, config = spec.strip().partition("/")
      out.append((name, config or None))
  if not out:
    raise ValueError(f"No dataset named in {specs!r}; use 'name' or 'name/config', "
                     "comma-separated.")
  return out


def prepare(name: str, *, data_dir: str, config=None, build_if_missing: bool = True):
  """The dataset's builder, prepared (array_record) under `data_dir`.

  Only `synthetic_reid` is built here when missing; other datasets must have been built.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  builder = _builder(name, config, data_dir)
  if not (builder.data_path / "dataset_info.json").exists():  # is_prepared() also logs a warning
    if name != SYNTHETIC or not build_if_missing:
      raise FileNotFoundError(_not_prepared(name, config, data_dir))
    logging.getLogger(__name__).info(
        "Building %s/%s into %s (once; takes seconds).", name, builder.builder_config.name, data_dir)
    builder.download_and_prepare(file_format="array_record")
  return builder


def load_train(specs: str, *, data_dir: str) -> ReidSplit:
  """The training split of `specs` ("name[/config]", comma-separated for several sources)."""
  (name, config), *more = parse_specs(specs)
  if more:
    raise ValueError(f"dataset.train={specs!r} names several datasets; multi-source training "
                     "is not supported yet — train on one.")
  return load_split(name, "train", data_dir=data_dir, config=config)


def load_split(name: str, split: str, *, data_dir: str,
               config: "str | tfds.core.BuilderConfig | None" = None,
               build_if_missing: bool = True) -> ReidSplit:
  """Opens `split` ("train", "query", "gallery") of a prepared dataset; junk ids (-1) are dropped.

  `synthetic_reid` is built (array_record) when missing; `config` may then also be a
  `SyntheticReidConfig` with custom sizes. Other datasets must have been built beforehand.
  """
  builder = prepare(name, config=config, data_dir=data_dir, build_if_missing=build_if_missing)
  if split not in builder.info.splits:
    raise ValueError(f"Dataset {builder.info.full_name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}.")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(f"Dataset {builder.info.full_name} under {data_dir} was built as "
                     f"{builder.info.file_format}, which has no random access; rebuild it with "
                     f"--file_format=array_record.")

  columns = _metadata(builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()}))
  pids = np.asarray(columns.get("pid", []), np.int32)
  keep = np.flatnonzero(pids != _JUNK_PID)
  pids = pids[keep]
  labels, num_classes = relabel(pids)
  times = columns.get("time")
  times = (np.full(len(keep), np.nan, np.float32) if times is None
           else np.asarray(times, np.float32)[keep])
  filenames = [columns["filename"][i] for i in keep]
  return ReidSplit(
      source=_Rows(builder.as_data_source(split), keep),
      pids=pids,
      labels=labels,
      cams=np.asarray(columns["camera"], np.int32)[keep],
      times=times,
      filenames=[f.decode("utf-8") if isinstance(f, bytes) else str(f) for f in filenames],
      num_classes=num_classes,
      name=f"{builder.info.full_name.rsplit('/', 1)[0]}:{split}",
  )
