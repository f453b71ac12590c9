"""Batches of decoded, transformed images from a `ReidSplit`, decoded in parallel by grain."""
from collections.abc import Iterator

import grain
import numpy as np

from jaxreid.data.augment import eval_transform, train_transform
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


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=prefetch if num_threads > 0 else 0)


def train_batches(split: ReidSplit, plan: np.ndarray, *, epoch: int, start_batch: int = 0,
                  seed: int, height: int, width: int, augment: dict | None,
                  slots: slice = slice(None), num_threads: int = 2,
                  prefetch: int = 2, resize: str = "bicubic") -> Iterator[dict]:
  """Batches `start_batch`..nb-1 of `plan` [nb, B] as {"image" uint8 [b, h, w, 3],
  "label" int32 [b], "index" int32 [b]}, each holding the `slots` of its batch (a process's
  share under multi-host; default all B).

  The augmentation of slot s of batch b draws from rng([seed, epoch, b, s]) only, so a run resumed
  at any batch, or split over any number of processes, sees the same images. `augment` holds
  `train_transform`'s keyword arguments; None means resize only. `prefetch` counts batches.
  `resize`: the interpolation (data.resize: bicubic or bilinear).
  """
  plan = np.asarray(plan)
  if plan.ndim != 2:
    raise ValueError(f"plan must be [num_batches, batch_size], got shape {plan.shape}.")
  slot_ids = np.arange(plan.shape[1])[slots]
  num_batches, batch_size = plan.shape[0], len(slot_ids)

  def example(position: int) -> dict:
    b, local = divmod(position, batch_size)
    slot = int(slot_ids[local])
    index = int(plan[b, slot])
    image = load_image(split, index)
    if augment is None:
      image = eval_transform(image, height=height, width=width, resize=resize)
    else:
      rng = np.random.default_rng([seed, epoch, b, slot])
      image = train_transform(image, rng, height=height, width=width, resize=resize, **augment)
    return {"image": image, "label": np.int32(split.labels[index]), "index": np.int32(index)}

  positions = grain.MapDataset.range(start_batch * batch_size, num_batches * batch_size)
  dataset = positions.map(example).to_iter_dataset(
      _read_options(num_threads, prefetch * batch_size)).batch(batch_size)
  yield from dataset


def eval_batches(split: ReidSplit, *, batch_size: int, height: int, width: int,
                 indices: np.ndarray | None = None, num_threads: int = 2,
                 prefetch: int = 2, resize: str = "bicubic") -> Iterator[tuple[dict, int]]:
  """({"image": uint8 [batch_size, h, w, 3]}, num_valid) in dataset (or `indices`) order; the
  last batch is zero-padded to batch_size so every batch has one shape."""
  order = np.arange(len(split)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
  total = len(order)
  padded = -(-total // batch_size) * batch_size

  def example(position: int) -> np.ndarray:
    if position >= total:
      return np.zeros((height, width, 3), np.uint8)
    return eval_transform(load_image(split, int(order[position])), height=height, width=width,
                          resize=resize)

  dataset = grain.MapDataset.range(padded).map(example).to_iter_dataset(
      _read_options(num_threads, prefetch * batch_size)).batch(batch_size)
  for b, images in enumerate(dataset):
    yield {"image": images}, min(batch_size, total - b * batch_size)

