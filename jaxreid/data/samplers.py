"""Batch plans: which dataset indices each batch of an epoch holds.

A plan is a pure function of (seed, epoch[, class distances]), except for the graph sampler, whose
per-class pointers carry over between epochs (its `state_dict` is saved in every checkpoint); so a
resumed run rebuilds the same plan and skips the batches it already did.
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

  As the official sampler (QAConv-GS, docs/methods/qaconv.md), each class keeps a pointer into a
  shuffled list of its images across epochs, and reshuffles that list only when the pointer
  reaches its end. That state (`state_dict` / `load_state_dict`: per class, the pass number and
  the pointer) changes with every plan, so a resumed run restores it from the checkpoint. Pass n
  of class c uses `class_order(c, n)`; batch order: default_rng([seed, epoch, 1]).permutation(C).
  """

  def __init__(self, labels: np.ndarray, *, batch_size: int, num_instances: int, seed: int):
    self._index = _class_indices(labels)
    self.num_classes = len(self._index)
    self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
    self._per_batch = _check_batch(batch_size, num_instances, self.num_classes)
    self._pass = np.zeros(self.num_classes, np.int64)      # how often each class reshuffled
    self._pointer = np.zeros(self.num_classes, np.int64)   # next position in the current pass
    self._orders = {}                                      # class → its current pass's order

  def class_order(self, c: int, n: int) -> np.ndarray:
    """The dataset indices of class c in the order of its n-th pass (n = 0: the first)."""
    return np.random.default_rng([self.seed, c, n, 2]).permutation(self._index[c])

  def state_dict(self) -> dict:
    """Copies of the per-class pass numbers and pointers."""
    return {"pass": self._pass.copy(), "pointer": self._pointer.copy()}

  def load_state_dict(self, state: dict) -> None:
    passes, pointer = np.asarray(state["pass"]), np.asarray(state["pointer"])
    if passes.shape != (self.num_classes,) or pointer.shape != (self.num_classes,):
      raise ValueError(f"The graph sampler state has {passes.shape[0]} classes but the training "
                       f"data has {self.num_classes}.")
    self._pass, self._pointer = passes.astype(np.int64), pointer.astype(np.int64)
    self._orders = {}

  def _take(self, c: int, k: int) -> list:
    """The next k images of class c (the official pointer: reshuffle on reaching the end)."""
    if c not in self._orders:
      self._orders[c] = self.class_order(c, int(self._pass[c]))
    out = []
    while len(out) < k:
      images = self._orders[c]
      end = self._pointer[c] + k - len(out)
      out.extend(images[self._pointer[c]:end].tolist())
      self._pointer[c] = end
      if end >= len(images):
        self._pass[c] += 1
        self._pointer[c] = 0
        self._orders[c] = self.class_order(c, int(self._pass[c]))
    return out

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
    """int64 [C, batch_size]: the batch of class c = its neighbours (nearest first), then c, K
    images each from the per-class pointers (advanced in that order, leaders 0..C-1, as the
    official sampler); batches in a shuffled order. Advances the sampler state."""
    rng = np.random.default_rng([self.seed, epoch, 1])
    k = self.num_instances
    neighbours = self.neighbours(class_distance)
    batches = np.empty((self.num_classes, self.batch_size), np.int64)
    for leader in range(self.num_classes):
      batches[leader] = [i for c in [*neighbours[leader], leader] for i in self._take(int(c), k)]
    return batches[rng.permutation(self.num_classes)]


class IdentitySampler:
  """reid-strong-baseline's RandomIdentitySampler (docs/methods/embedding.md): an epoch covers
  every image. Each class's images are shuffled and cut into chunks of K (a class with fewer
  than K images is first drawn up to K with replacement; a last partial chunk is dropped); then,
  while at least P = batch_size / K classes have chunks left, P of them are drawn at random
  (without replacement) and each gives its next chunk. The number of batches differs between
  epochs (`epoch_lengths`).

  Random draws, in order (what a transcription of the official loop must consume to agree):
  images: default_rng([seed, epoch, 0]): per class in class order, `choice(idx, K,
  replace=True)` when it has fewer than K images, then `permutation`; classes:
  default_rng([seed, epoch, 1]): one `choice(available, P, replace=False)` per batch, over the
  available classes in class order.
  """

  def __init__(self, labels: np.ndarray, *, batch_size: int, num_instances: int, seed: int):
    self._index = _class_indices(labels)
    self.num_classes = len(self._index)
    self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
    self._per_batch = _check_batch(batch_size, num_instances, self.num_classes)
    self._chunks = np.asarray([max(1, len(idx) // num_instances) for idx in self._index])

  @property
  def num_batches(self) -> int:
    """The official length estimate (every chunk used) in batches; an epoch has at most this."""
    return int(self._chunks.sum()) // self._per_batch

  def _class_order(self, epoch: int) -> list[np.ndarray]:
    """The classes of each batch of `epoch`, in order."""
    rng = np.random.default_rng([self.seed, epoch, 1])
    left = self._chunks.copy()
    available = list(range(self.num_classes))
    batches = []
    while len(available) >= self._per_batch:
      chosen = rng.choice(np.asarray(available), self._per_batch, replace=False)
      batches.append(chosen)
      for c in chosen:
        left[c] -= 1
        if left[c] == 0:
          available.remove(int(c))
    return batches

  def epoch_lengths(self, epochs: int) -> list[int]:
    """Batches in each of epochs 0 … epochs-1 (for a schedule counted in epochs)."""
    return [len(self._class_order(e)) for e in range(epochs)]

  def epoch_plan(self, epoch: int) -> np.ndarray:
    """int64 [batches of this epoch, batch_size]: P classes × their next chunk of K."""
    rng = np.random.default_rng([self.seed, epoch, 0])
    k = self.num_instances
    chunks = []
    for idx in self._index:
      if len(idx) < k:
        idx = rng.choice(idx, k, replace=True)
      idx = rng.permutation(idx)
      chunks.append(idx[:len(idx) // k * k].reshape(-1, k))
    pointer = np.zeros(self.num_classes, np.int64)
    rows = []
    for classes in self._class_order(epoch):
      rows.append(np.concatenate([chunks[c][pointer[c]] for c in classes]))
      pointer[classes] += 1
    return np.asarray(rows, np.int64).reshape(len(rows), self.batch_size)
