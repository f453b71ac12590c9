"""Prepared TFDS re-id splits as random-access sources plus their metadata arrays."""
from collections.abc import Sequence
import dataclasses
import importlib
import logging
import os
from pathlib import Path

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
  domains: np.ndarray | None = None   # int32 source index per row (multi-source training)

  def __post_init__(self):
    if self.domains is None:
      self.domains = np.zeros(len(self.pids), np.int32)

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


class _Concat(Sequence):
  """Several row sequences one after another."""

  def __init__(self, parts: Sequence[Sequence[dict]]):
    self._parts = list(parts)
    self._ends = np.cumsum([len(p) for p in self._parts])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"row {i} out of range for {len(self)} rows")
    part = int(np.searchsorted(self._ends, i, side="right"))
    return self._parts[part][i - (int(self._ends[part - 1]) if part else 0)]


def _builder_module(name: str):
  """The repo's `tfds_builders/<name>` module (importing it registers the builder), or None."""
  module = f"tfds_builders.{name}.{name}_dataset_builder"
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name is not None and module.startswith(e.name):
      return None
    raise


def _builder(name: str, config, data_dir: str, **kwargs) -> tfds.core.DatasetBuilder:
  module = _builder_module(name)
  if module is not None:
    return module.Builder(config=config, data_dir=data_dir, **kwargs)
  try:  # prepared by a builder that is not in this repo: read it from its files
    return tfds.builder(name if config is None else f"{name}/{config}", data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known_datasets())} (or a "
                     f"dataset prepared by another TFDS builder under {data_dir}).") from e


def known_datasets() -> list[str]:
  """The datasets this repository has builders for."""
  root = Path(importlib.import_module("tfds_builders").__path__[0])
  return sorted(p.name for p in root.iterdir()
                if (p / f"{p.name}_dataset_builder.py").is_file())


def resolve(config) -> None:
  """Checks that every dataset of config.dataset.train and .test exists and is prepared (a
  missing synthetic one is built, a missing real one is built from dataset.manual_dir when
  given), so that a mistyped or unbuilt test set stops the run before its first step."""
  d = config.dataset
  for specs in (d.train, d.test):
    for name, builder_config in parse_specs(specs):
      prepare(name, config=builder_config, data_dir=d.data_dir, manual_dir=d.get("manual_dir"))


def _not_prepared(name: str, config, data_dir: str) -> str:
  full = name if config is None else f"{name}/{getattr(config, 'name', config)}"
  if name == SYNTHETIC:
    return (f"Dataset {full} is not prepared under {data_dir}: build it (no download needed) "
            f"with `python main.py --config <config> --mode=build`.")
  return (f"Dataset {full} is not prepared under {data_dir}: build it from its manual download "
          f"first, e.g. `python main.py --config <config> --mode=build "
          f"--config.dataset.data_dir={data_dir} --config.dataset.manual_dir=<downloads>` or "
          f"`tfds build tfds_builders/{name} --data_dir={data_dir} --manual_dir=<downloads> "
          f"--file_format=array_record` (the builder's MANUAL_DOWNLOAD_INSTRUCTIONS say what "
          f"to download).")


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


def prepare(name: str, *, data_dir: str, config=None, build_if_missing: bool = True,
            manual_dir: str | None = None, skip_bad_images: bool = False):
  """The dataset's builder, prepared (array_record) under `data_dir`.

  When it is missing, `synthetic_reid` is built (needs nothing); a real dataset is built from
  `manual_dir` (its extracted download) when given, and is an error otherwise.
  `skip_bad_images` skips unreadable images of a real dataset (each one warned about).
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  kwargs = {}
  if name != SYNTHETIC and _builder_module(name) is not None:
    kwargs["skip_bad_images"] = skip_bad_images
  builder = _builder(name, config, data_dir, **kwargs)
  if (builder.data_path / "dataset_info.json").exists():  # is_prepared() also logs a warning
    return builder
  log = logging.getLogger(__name__)
  if name == SYNTHETIC and build_if_missing:
    log.info("Building %s/%s into %s (once; takes seconds).", name,
             builder.builder_config.name, data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder
  if manual_dir is None or not build_if_missing:
    raise FileNotFoundError(_not_prepared(name, config, data_dir))
  manual_dir = os.path.expanduser(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"The manual directory {manual_dir} does not exist; extract the "
                            f"download of {name} there. {_instructions(builder)}")
  log.info("Building %s from %s into %s.", builder.info.full_name, manual_dir, data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _instructions(builder) -> str:
  text = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  return f"Expected:\n{text}" if text else ""


def load_train(specs: str, *, data_dir: str, manual_dir: str | None = None) -> ReidSplit:
  """The training split of `specs` ("name[/config]", comma-separated for several sources).

  Several sources are concatenated: every (source, pid) is its own class (labels 0..C-1,
  source by source), `pids` stay the original ids and `domains` holds each row's source index.
  With `manual_dir`, missing real datasets are built from it first.
  """
  sources = parse_specs(specs)
  if len(set(sources)) != len(sources):
    raise ValueError(f"dataset.train={specs!r} names a dataset twice.")
  splits = [load_split(name, "train", data_dir=data_dir, config=config, manual_dir=manual_dir)
            for name, config in sources]
  return splits[0] if len(splits) == 1 else concatenate(splits)


def concatenate(splits: Sequence[ReidSplit]) -> ReidSplit:
  """One split of all `splits` in order; classes are relabelled per source, `domains` = index."""
  offsets = np.cumsum([0] + [s.num_classes for s in splits])
  return ReidSplit(
      source=_Concat([s.source for s in splits]),
      pids=np.concatenate([s.pids for s in splits]).astype(np.int32),
      labels=np.concatenate([s.labels + o for s, o in zip(splits, offsets)]).astype(np.int32),
      cams=np.concatenate([s.cams for s in splits]).astype(np.int32),
      times=np.concatenate([s.times for s in splits]).astype(np.float32),
      filenames=[f for s in splits for f in s.filenames],
      num_classes=int(offsets[-1]),
      name="+".join(s.name for s in splits),
      domains=np.concatenate([np.full(len(s), d, np.int32) for d, s in enumerate(splits)]),
  )


def load_split(name: str, split: str, *, data_dir: str,
               config: "str | tfds.core.BuilderConfig | None" = None,
               build_if_missing: bool = True, manual_dir: str | None = None) -> ReidSplit:
  """Opens `split` ("train", "query", "gallery") of a prepared dataset; junk ids (-1) are dropped.

  `synthetic_reid` is built (array_record) when missing; `config` may then also be a
  `SyntheticReidConfig` with custom sizes. Other datasets must have been built beforehand, or
  are built from `manual_dir` when it is given.
  """
  builder = prepare(name, config=config, data_dir=data_dir, build_if_missing=build_if_missing,
                    manual_dir=manual_dir)
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
