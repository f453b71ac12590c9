"""Batch plans: which dataset indices each batch of an epoch holds.

A plan is a pure function of (seed, epoch[, class distances]); samplers keep no state between
epochs, so a resumed run rebuilds the same plan and skips the batches it already did.
"""
import numpy as np


def _class_indices(labels: np.ndarray) -> list[np.ndarray]:
  """Dataset indices of each class 0..C-1; labels must be exactly 0..C-1, each used."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
  classes = np.unique(labels)
  if classes[0] != 0 or classes[-1] != len(classes) - 1:
    raise ValueError("labels must be 0..C-1 with every class present (relabel the ids first).")
  order = np.argsort(labels, kind="stable")
  return np.split(order, np.cumsum(np.bincount(labels))[:-1])


def _check_batch(batch_size: int, num_instances: int, num_classes: int) -> int:
  """Classes per batch."""
  if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
    raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instances "
                     f"({num_instances}).")
  per_batch = batch_size // num_instances
  if per_batch > num_classes:
    raise ValueError(f"A batch needs batch_size / num_instances = {per_batch} classes but the "
                     f"data has only {num_classes}; lower batch_size or raise num_instances.")
  return per_batch


class RandomSampler:
  """Every image once per epoch in a random order (the official QAConv sampler); the last
  incomplete batch is dropped."""

  def __init__(self, labels: np.ndarray, *, batch_size: int, seed: int, **unused):
    self.num_images, self.batch_size, self.seed = len(labels), batch_size, seed
    if not 0 < batch_size <= self.num_images:
      raise ValueError(f"batch_size ({batch_size}) must be between 1 and the number of training "
                       f"images ({self.num_images}).")

  @property
  def num_batches(self) -> int:
    return self.num_images // self.batch_size

  def epoch_plan(self, epoch: int) -> np.ndarray:
    """int64 [num_batches, batch_size]."""
    order = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
    return order[:self.num_batches * self.batch_size].reshape(self.num_batches, self.batch_size)


class PKSampler:
  """P classes x K images per batch; every class once per epoch, in a random order."""

  def __init__(self, labels: np.ndarray, *, batch_size: int, num_instances: int, seed: int):
    self._index = _class_indices(labels)
    self.num_classes = len(self._index)
    self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
    self._per_batch = _check_batch(batch_size, num_instances, self.num_classes)

  @property
  def num_batches(self) -> int:
    return self.num_classes // self._per_batch

  def epoch_plan(self, epoch: int) -> np.ndarray:
    """int64 [num_batches, batch_size]; K draws per class (with replacement if it has < K)."""
    rng = np.random.default_rng([self.seed, epoch])
    k = self.num_instances
    rows = [rng.choice(self._index[c], k, replace=len(self._index[c]) < k)
            for c in rng.permutation(self.num_classes)]
    rows = rows[:self.num_batches * self._per_batch]  # drop the incomplete last batch
    return np.asarray(rows, np.int64).reshape(self.num_batches, self.batch_size)


class GraphSampler:
  """QAConv's graph sampler: each class leads one batch with its nearest classes.

  Per epoch: `representatives(epoch)` picks one image per class; the caller scores them with the
  current model into a [C, C] class distance; `epoch_plan(epoch, distance)` gives C batches.
  """

  def __init__(self, labels: np.ndarray, *, batch_size: int, num_instances: int, seed: int):
    self._index = _class_indices(labels)
    self.num_classes = len(self._index)
    self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
    self._per_batch = _check_batch(batch_size, num_instances, self.num_classes)

  @property
  def num_batches(self) -> int:
    return self.num_classes

  def representatives(self, epoch: int) -> np.ndarray:
    """int64 [C]: one random dataset index of each class, in class order."""
    rng = np.random.default_rng([self.seed, epoch, 0])
    return np.asarray([rng.choice(idx) for idx in self._index], np.int64)

  def neighbours(self, class_distance: np.ndarray) -> np.ndarray:
    """int64 [C, B/K - 1]: each class's nearest other classes, nearest first."""
    c = self.num_classes
    dist = np.array(class_distance, np.float64)
    if dist.shape != (c, c):
      raise ValueError(f"class_distance must be [{c}, {c}] (one row per class), got {dist.shape}.")
    dist[np.isnan(dist)] = np.inf
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    return order[:, :self._per_batch - 1].astype(np.int64)

  def epoch_plan(self, epoch: int, class_distance: np.ndarray) -> np.ndarray:
    """int64 [C, batch_size]: batch of class c = c then its neighbours, K images each, taken
    from a per-class pointer cycling over a shuffled list; batches in a shuffled order."""
    rng = np.random.default_rng([self.seed, epoch, 1])
    k = self.num_instances
    neighbours = self.neighbours(class_distance)
    shuffled = [rng.permutation(idx) for idx in self._index]
    pointer = np.zeros(self.num_classes, np.int64)
    batches = np.empty((self.num_classes, self.batch_size), np.int64)
    for leader in range(self.num_classes):
      for slot, c in enumerate([leader, *neighbours[leader]]):
        images = shuffled[c]
        batches[leader, slot * k:(slot + 1) * k] = images[(pointer[c] + np.arange(k)) % len(images)]
        pointer[c] += k
    return batches[rng.permutation(self.num_classes)]
