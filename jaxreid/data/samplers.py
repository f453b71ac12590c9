"""Batch plans: which dataset indices each batch of an epoch holds.

Every sampler is a `Sampler`, the one protocol the training loop uses; `make_sampler` builds the
one `data.sampler` names. A plan is a pure function of (seed, epoch[, model scores]), except for
the graph sampler, whose per-class pointers carry over between epochs (its `state_dict` is saved
in every checkpoint); so a resumed run rebuilds the same plan and skips the batches it already
did.
"""
from typing import Callable

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


class Sampler:
  """What the training loop asks of a sampler.

  plan(epoch, score) → the epoch's batches, int64 [batches, batch_size] of dataset indices;
    `score(indices)` → float32 [n, n]: the current model's scores between those training images,
    which a sampler that groups similar classes asks for (the graph sampler; the others ignore
    it);
  epoch_lengths(epochs) → the batches of each of epochs 0 … epochs-1 (the lr schedule's epochs);
  state_dict() / load_state_dict(state): what carries over between epochs, as NumPy arrays
    (saved in every checkpoint; nothing for most samplers).
  A sampler with neither scores nor state defines `epoch_plan(epoch)` and `num_batches`.
  """

  def epoch_plan(self, epoch: int) -> np.ndarray:
    raise NotImplementedError

  @property
  def num_batches(self) -> int:
    raise NotImplementedError

  def plan(self, epoch: int, score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    del score
    return self.epoch_plan(epoch)

  def epoch_lengths(self, epochs: int) -> list[int]:
    return [self.num_batches] * epochs

  def state_dict(self) -> dict:
    return {}

  def load_state_dict(self, state: dict) -> None:
    del state


class RandomSampler(Sampler):
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


class PKSampler(Sampler):
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


class GraphSampler(Sampler):
  """QAConv's graph sampler: each class leads one batch with its nearest classes.

  Per epoch (`plan`): `representatives(epoch)` picks one image per class; the model's scores
  between them give a [C, C] class distance (−score, or with `rerank` QAConv-GS v2.0's re-ranked
  `v20_graph_distance`); `epoch_plan(epoch, distance)` gives C batches.

  As the official sampler (QAConv-GS, docs/methods/qaconv.md), each class keeps a pointer into a
  shuffled list of its images across epochs, and reshuffles that list only when the pointer
  reaches its end. That state (`state_dict` / `load_state_dict`: per class, the pass number and
  the pointer) changes with every plan, so a resumed run restores it from the checkpoint. Pass n
  of class c uses `class_order(c, n)`; batch order: default_rng([seed, epoch, 1]).permutation(C).

  `pre_epochs` (QAConv-GS v2.0's `--gs_pre_epochs`): epochs 0 … pre_epochs-1 use the random PK
  index instead (`pre_epoch_plan`; no class distance needed, see `needs_distance`), which leaves
  the pointers alone, as the official sampler does.
  """

  def __init__(self, labels: np.ndarray, *, batch_size: int, num_instances: int, seed: int,
               pre_epochs: int = 0, rerank: bool = False):
    self._index = _class_indices(labels)
    self.num_classes = len(self._index)
    self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
    self._per_batch = _check_batch(batch_size, num_instances, self.num_classes)
    self.pre_epochs, self.rerank = int(pre_epochs), bool(rerank)
    # Chunks of K per class in a pre-epoch: ⌊n/K⌋ (1 when n < K), at most batch_size of them.
    self._pre_chunks = np.asarray([min(max(1, len(idx) // num_instances), batch_size)
                                   for idx in self._index])
    if self.pre_epochs < 0 or (self.pre_epochs and self._pre_batches < 1):
      raise ValueError(f"pre_epochs ({pre_epochs}) must be >= 0, and a pre-epoch needs at least "
                       f"one full batch of {batch_size} images.")
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
    """Batches of a graph epoch (C)."""
    return self.num_classes

  @property
  def _pre_batches(self) -> int:
    return int(self._pre_chunks.sum()) * self.num_instances // self.batch_size

  def epoch_lengths(self, epochs: int) -> list[int]:
    """Batches in each of epochs 0 … epochs-1 (pre-epochs are shorter or longer than C)."""
    return [self._pre_batches if e < self.pre_epochs else self.num_classes for e in range(epochs)]

  def needs_distance(self, epoch: int) -> bool:
    """Whether `epoch_plan(epoch, …)` uses a class distance (False in a pre-epoch)."""
    return epoch >= self.pre_epochs

  def pre_epoch_plan(self, epoch: int) -> np.ndarray:
    """int64 [pre-epoch batches, batch_size]: QAConv-GS v2.0's random PK index
    (docs/methods/qaconv.md). Per class, in class order: a class with n < K images gets K - n
    more drawn from them with replacement (`choice(idx, K - n)`), the images are shuffled
    (`permutation`) and cut into min(⌊n/K⌋ or 1, batch_size) chunks of K; the chunks of all
    classes are shuffled (`permutation` of the rows), flattened and cut into batches; the last
    partial batch is dropped. Every draw comes from default_rng([seed, epoch, 3]), in that order.
    The pointers are not touched."""
    rng = np.random.default_rng([self.seed, epoch, 3])
    k = self.num_instances
    rows = []
    for idx, chunks in zip(self._index, self._pre_chunks):
      if len(idx) < k:
        idx = np.concatenate([idx, rng.choice(idx, k - len(idx), replace=True)])
      rows.append(rng.permutation(idx)[:chunks * k].reshape(chunks, k))
    rows = np.concatenate(rows)
    flat = rows[rng.permutation(len(rows))].reshape(-1)
    n = self._pre_batches
    return flat[:n * self.batch_size].reshape(n, self.batch_size).astype(np.int64)

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

  def plan(self, epoch: int, score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`epoch_plan` of the class distance of `score(representatives(epoch))`: −score, or with
    `rerank` `v20_graph_distance(score)`; in a pre-epoch, no scores."""
    if not self.needs_distance(epoch):
      return self.pre_epoch_plan(epoch)
    scores = score(self.representatives(epoch))
    return self.epoch_plan(epoch, v20_graph_distance(scores) if self.rerank else -scores)

  def epoch_plan(self, epoch: int, class_distance: np.ndarray | None = None) -> np.ndarray:
    """int64 [C, batch_size]: the batch of class c = its neighbours (nearest first), then c, K
    images each from the per-class pointers (advanced in that order, leaders 0..C-1, as the
    official sampler); batches in a shuffled order. Advances the sampler state. In a pre-epoch,
    `pre_epoch_plan(epoch)` (class_distance unused)."""
    if not self.needs_distance(epoch):
      return self.pre_epoch_plan(epoch)
    if class_distance is None:
      raise ValueError(f"epoch {epoch} is a graph epoch and needs class_distance [C, C].")
    rng = np.random.default_rng([self.seed, epoch, 1])
    k = self.num_instances
    neighbours = self.neighbours(class_distance)
    batches = np.empty((self.num_classes, self.batch_size), np.int64)
    for leader in range(self.num_classes):
      batches[leader] = [i for c in [*neighbours[leader], leader] for i in self._take(int(c), k)]
    return batches[rng.permutation(self.num_classes)]


class IdentitySampler(Sampler):
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


class MultiGallerySampler(Sampler):
  """KPM's RandomMultipleGallerySampler (docs/methods/kpm.md): an epoch makes every image an
  anchor once, in a random order, each followed by K − 1 images of its identity from other
  cameras; N × K images per epoch, cut into batches (the last partial one dropped). A batch is
  B / K such groups, the anchor first.

  As the official sampler, the K − 1 partners are drawn from the anchor's identity's images in
  other cameras, without replacement when there are at least K of them, else with; when the
  identity has no image in another camera, from its other images (same rule); an identity of a
  single image (where the official code fails) repeats the anchor.

  Random draws, in order: default_rng([seed, epoch]): `permutation(N)`, then per anchor in that
  order one `choice(candidates, K - 1, replace=len(candidates) < K)`.
  """

  def __init__(self, labels: np.ndarray, cams: np.ndarray, *, batch_size: int,
               num_instances: int, seed: int):
    index = _class_indices(labels)
    labels, cams = np.asarray(labels), np.asarray(cams)
    if cams.shape != labels.shape:
      raise ValueError(f"The training split has {len(labels)} labels but {cams.size} camera ids; "
                       "the multi-gallery sampler needs one camera id per image.")
    self.num_images = len(labels)
    self.batch_size, self.num_instances, self.seed = batch_size, num_instances, seed
    if num_instances < 2 or batch_size < num_instances or batch_size % num_instances:
      raise ValueError(f"batch_size ({batch_size}) must be a multiple of num_instances "
                       f"({num_instances}), which must be at least 2 (an anchor and a partner).")
    if self.num_batches < 1:
      raise ValueError(f"batch_size ({batch_size}) exceeds the {self.num_images * num_instances} "
                       "images of a multi-gallery epoch; lower data.batch_size.")
    self._candidates = [None] * self.num_images   # per image: the images it draws partners from
    for idx in index:
      for i in idx:
        other_cams = idx[cams[idx] != cams[i]]
        self._candidates[i] = (other_cams if other_cams.size else idx[idx != i]
                               if idx.size > 1 else np.asarray([i]))

  @property
  def num_batches(self) -> int:
    return self.num_images * self.num_instances // self.batch_size

  def epoch_plan(self, epoch: int) -> np.ndarray:
    """int64 [num_batches, batch_size]: anchors in a random order, each with its K − 1 partners."""
    rng = np.random.default_rng([self.seed, epoch])
    k = self.num_instances
    rows = np.empty((self.num_images, k), np.int64)
    for row, i in zip(rows, rng.permutation(self.num_images)):
      cand = self._candidates[i]
      row[0] = i
      row[1:] = rng.choice(cand, k - 1, replace=len(cand) < k)
    return rows.reshape(-1)[:self.num_batches * self.batch_size].reshape(-1, self.batch_size)


def make_sampler(config, split) -> Sampler:
  """The sampler of `config.data.sampler` over the training `split` (its labels, and camera ids
  for "multi_gallery"), seeded by config.seed."""
  d = config.data
  common = dict(batch_size=d.batch_size, num_instances=d.num_instances, seed=config.seed)
  if d.sampler == "gs":
    return GraphSampler(split.labels, **common, pre_epochs=d.get("gs_pre_epochs", 0),
                        rerank=d.get("gs_rerank", False))
  if d.sampler == "multi_gallery":
    return MultiGallerySampler(split.labels, split.cams, **common)
  by_labels = {"pk": PKSampler, "random": RandomSampler, "identity": IdentitySampler}
  if d.sampler not in by_labels:
    raise ValueError(f"data.sampler={d.sampler!r} is unknown; use 'gs', 'pk', 'random', "
                     "'identity' or 'multi_gallery'.")
  return by_labels[d.sampler](split.labels, **common)


def v20_graph_distance(scores: np.ndarray) -> np.ndarray:
  """QAConv-GS v2.0's class distance of the graph sampler (`data.gs_rerank`,
  docs/methods/qaconv.md): 1 − sigmoid(score / 10) (v2.0's pairwise_distance; a NaN score is as
  far as can be, 1), k-reciprocal re-ranked as v2.0 does (`rerank_graph_distance`)."""
  with np.errstate(over="ignore"):
    distance = 1 - 1 / (1 + np.exp(-scores / 10))
  distance[np.isnan(distance)] = 1
  return rerank_graph_distance(distance)


def rerank_graph_distance(distance: np.ndarray, k1: int = 20, k2: int = 6,
                          lambda_value: float = 0.3) -> np.ndarray:
  """QAConv-GS v2.0's re-ranked graph distance (docs/methods/qaconv.md), float32 [C, C].

  k-reciprocal re-ranking (Zhong et al., CVPR 2017) as the official dense code runs it on the
  class distance D [C, C] (D[p, g]: probe p, gallery g; need not be symmetric) doubled into
  [[D, D], [D, D]]: 2C items, the first C the queries; the result is the block of the queries ×
  the second copies. As that code: each column divided by its maximum and the result transposed
  (row r ranks the items s by D[s, r]); the weights V, their query expansion and the Jaccard
  distances in float16 (with its rounding, in its order of summation); (1 - λ)·Jaccard + λ·the
  normalised distance. Ties (every item has a twin) rank in index order. D is not symmetric for
  QAConv, so `jaxreid.eval.rerank.rerank`, which takes [[QQ, QG], [QGᵀ, GG]], cannot express it.
  """
  d = np.asarray(distance, np.float32)
  c = len(d)
  if d.ndim != 2 or d.shape != (c, c) or c < 1:
    raise ValueError(f"distance must be a square [C, C] matrix, got shape {d.shape}.")
  n = 2 * c
  norm = (d / d.max(axis=0)).T          # row r of the doubled working matrix is [norm[r], norm[r]]
  k, k_half = min(k1 + 1, n), min(int(np.around(k1 / 2)) + 1, n)
  width = min(max(k, k2), n)
  rank = np.empty((c, width), np.int64)
  for start in range(0, c, 256):      # rows r and r + C are the same: rank the first C
    block = norm[start:start + 256]
    rank[start:start + 256] = np.argsort(np.concatenate([block, block], 1), axis=1,
                                         kind="stable")[:, :width]
  rank = np.concatenate([rank, rank])
  items = np.arange(n)
  reciprocal = (rank[rank[:, :k], :k] == items[:, None, None]).any(-1)            # [n, k]
  half = (rank[rank[:, :k_half], :k_half] == items[:, None, None]).any(-1)       # [n, k_half]
  v = np.zeros((n, n), np.float16)
  for i in range(n):
    forward = rank[i, :k]
    members = forward[reciprocal[i]]
    cand, cand_in = rank[forward, :k_half], half[forward]                         # [k, k_half]
    overlap = (cand_in & np.isin(cand, members)).sum(1)
    grow = reciprocal[i] & (overlap > 2 / 3 * cand_in.sum(1))
    expanded = np.unique(np.concatenate([members, cand[grow[:, None] & cand_in]]))
    weight = np.exp(-norm[i % c, expanded % c])
    v[i, expanded] = weight / np.sum(weight)
  if k2 != 1:
    v = np.stack([np.mean(v[rank[i, :k2]], axis=0) for i in range(n)]).astype(np.float16)
  # For each column of V, the second copies (rows ≥ C) that weigh it (sorted by column).
  cols, rows = np.nonzero(v[c:].T)
  bounds = np.searchsorted(cols, np.arange(n + 1))
  out = np.empty((c, c), np.float32)
  for i in range(c):
    shared = np.zeros(c, np.float16)
    for col in np.flatnonzero(v[i]):
      r = rows[bounds[col]:bounds[col + 1]]
      shared[r] = shared[r] + np.minimum(v[i, col], v[c + r, col])
    jaccard = 1 - shared / (2 - shared)
    out[i] = jaccard * (1 - lambda_value) + norm[i] * lambda_value
  return out
