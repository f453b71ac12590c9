"""Batches of decoded, resized images from a `ReidSplit`, prepared in parallel by grain: in
threads of this process, and with `num_workers` > 0 in that many worker processes as well.

Training batches carry each slot's augmentation factors under "augment"; `augment.apply` turns
them into images inside the jitted step (`augmented`)."""
import os
from collections.abc import Iterator

import grain
from absl import flags
import numpy as np

from jaxreid.data import augment as augment_lib
from jaxreid.data.augment import eval_transform
from jaxreid.data.datasets import ReidSplit


def load_image(split: ReidSplit, index: int) -> np.ndarray:
  """The uint8 HxWx3 image of row `index`; a ValueError names the row when it is unusable."""
  where = f"image {index} ({split.filenames[index]}) of {split.name}"
  try:
    image = np.asarray(split.source[index]["image"])
  except Exception as e:  # any decoder failure means the same thing to the user
    raise ValueError(f"Cannot decode {where}: {e}") from e
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"Expected an RGB uint8 image (H, W, 3) for {where}, got "
                     f"{image.dtype} {image.shape}.")
  return image


def loader_processes(num_threads: int, num_workers: int) -> tuple[int, int]:
  """(threads per process, worker processes) for data.num_threads / data.num_workers, where −1
  picks from the core count: threads alone up to 6 cores (Pillow's decoding and resizing release
  the GIL, ~80 % of the per-image time), else cores // 4 workers (each imports the library:
  ~0.3 GB) that share the cores with their threads."""
  cores = os.cpu_count() or 1
  if num_workers < 0:
    num_workers = 0 if cores <= 6 else cores // 4
  if num_threads < 0:
    num_threads = max(1, cores // max(1, num_workers))
  return num_threads, num_workers


def _batches(make_batch, num_batches: int, start: int = 0, *, num_threads: int, prefetch: int,
             num_workers: int) -> Iterator:
  """make_batch(b) for b = start … num_batches − 1, in order, made by `num_threads` threads
  ahead of the reader (`prefetch` batches), and by `num_workers` processes (each with those
  threads) when > 0 (−1: `loader_processes`)."""
  num_threads, num_workers = loader_processes(num_threads, num_workers)
  batches = grain.MapDataset.range(start, num_batches).map(make_batch).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads,
                        prefetch_buffer_size=max(prefetch, num_threads) if num_threads else 0))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags (parsed by the CLI)
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(2, prefetch)))
  iterator = iter(batches)
  try:
    yield from iterator
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


class _TrainBatch:
  """Batch b of the plan: the slots' resized images, labels, rows and (with `augment`) their
  augmentation factors, slot s drawn from rng([seed, epoch, b, s]). One grain element per batch
  (grain's per-element cost is paid once per batch), and a class rather than a closure, so
  grain can send it to worker processes."""

  def __init__(self, split, plan, slot_ids, *, epoch, seed, height, width, augment, resize):
    self.split, self.plan, self.slot_ids = split, plan, slot_ids
    self.epoch, self.seed, self.height, self.width = epoch, seed, height, width
    self.augment, self.resize = augment, resize

  def __call__(self, b: int) -> dict:
    # In phases (factors, then decoding, then resizing) rather than image by image: each phase's
    # code and data stay in the CPU caches, which makes the batch ~20 % faster.
    rows = self.plan[b, self.slot_ids].astype(np.int32)
    out = {"label": self.split.labels[rows].astype(np.int32), "index": rows}
    if self.augment is not None:
      factors = [augment_lib.draw(np.random.default_rng([self.seed, self.epoch, b, int(slot)]),
                                  height=self.height, width=self.width, **self.augment)
                 for slot in self.slot_ids]
      if factors[0]:   # absent when every transform is off
        out["augment"] = {k: np.stack([f[k] for f in factors]) for k in factors[0]}
    out["image"] = _resized(self, [load_image(self.split, int(i)) for i in rows], len(rows))
    return out


def _resized(spec, images: list, size: int) -> np.ndarray:
  """uint8 [size, h, w, 3]: `images` resized as for evaluation, zeros after them."""
  out = np.zeros((size, spec.height, spec.width, 3), np.uint8)
  for i, image in enumerate(images):
    out[i] = eval_transform(image, height=spec.height, width=spec.width, resize=spec.resize)
  return out


def train_batches(split: ReidSplit, plan: np.ndarray, *, epoch: int, start_batch: int = 0,
                  seed: int, height: int, width: int, augment: dict | None,
                  slots: slice = slice(None), num_threads: int = 2, num_workers: int = 0,
                  prefetch: int = 2, resize: str = "bicubic") -> Iterator[dict]:
  """Batches `start_batch`..nb-1 of `plan` [nb, B] as {"image" uint8 [b, h, w, 3] (resized),
  "label" int32 [b], "index" int32 [b]} and, when `augment` is set, "augment": the slots'
  factors [b, …] (`augment.draw`; `augmented` applies them), each batch holding the
  `slots` of its plan row (a process's share under multi-host; default all B).

  The factors of slot s of batch b come from rng([seed, epoch, b, s]) only, so a run resumed at
  any batch, or split over any number of processes or workers, sees the same images. `augment`
  holds `augment.draw`'s keyword arguments (data.augment); None means resize only. `prefetch`
  counts batches; `num_threads`, `num_workers`: grain threads per process and worker
  processes (−1: `loader_processes` picks from the core count).
  `resize`: the interpolation (data.resize: bicubic or bilinear).
  """
  plan = np.asarray(plan)
  if plan.ndim != 2:
    raise ValueError(f"plan must be [num_batches, batch_size], got shape {plan.shape}.")
  if augment is not None:
    augment_lib.check_options(augment)
  slot_ids = np.arange(plan.shape[1])[slots]
  make_batch = _TrainBatch(split, plan, slot_ids, epoch=epoch, seed=seed, height=height,
                           width=width, augment=augment, resize=resize)
  yield from _batches(make_batch, plan.shape[0], start_batch, num_threads=num_threads,
                      prefetch=prefetch, num_workers=num_workers)


def augmented(batch: dict) -> dict:
  """`batch` with batch["augment"]'s factors applied to batch["image"] (`augment.apply`) and
  the factors dropped; the batch itself when it has none. For use inside a jitted step."""
  if "augment" not in batch:
    return batch
  batch = dict(batch)
  factors = batch.pop("augment")
  return {**batch, "image": augment_lib.apply(batch["image"], factors)}


class _EvalBatch:
  def __init__(self, split, order, *, batch_size, height, width, resize):
    self.split, self.order, self.batch_size = split, order, batch_size
    self.height, self.width, self.resize = height, width, resize

  def __call__(self, b: int) -> np.ndarray:
    rows = self.order[b * self.batch_size:(b + 1) * self.batch_size]
    return _resized(self, [load_image(self.split, int(i)) for i in rows], self.batch_size)


def eval_batches(split: ReidSplit, *, batch_size: int, height: int, width: int,
                 indices: np.ndarray | None = None, num_threads: int = 2, num_workers: int = 0,
                 prefetch: int = 2, resize: str = "bicubic") -> Iterator[tuple[dict, int]]:
  """({"image": uint8 [batch_size, h, w, 3]}, num_valid) in dataset (or `indices`) order; the
  last batch is zero-padded to batch_size so every batch has one shape."""
  order = np.arange(len(split)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
  total = len(order)
  make_batch = _EvalBatch(split, order, batch_size=batch_size, height=height, width=width,
                          resize=resize)
  batches = _batches(make_batch, -(-total // batch_size), num_threads=num_threads,
                     prefetch=prefetch, num_workers=num_workers)
  for b, images in enumerate(batches):
    yield {"image": images}, min(batch_size, total - b * batch_size)
