"""The identity sampler (data.sampler = "identity") against a transcription of
reid-strong-baseline's RandomIdentitySampler.__iter__ (docs/methods/embedding.md)."""
import copy
import random
from collections import defaultdict

import numpy as np
import pytest

from jaxreid.data.samplers import IdentitySampler


def official_iter(pids, batch_size, num_instances, *, choice, shuffle, sample):
  """RandomIdentitySampler.__iter__, line by line; its three random primitives are passed in
  (np.random.choice, random.shuffle, random.sample there). `pids`: the pid of each image."""
  index_dic = defaultdict(list)
  for index, pid in enumerate(pids):
    index_dic[pid].append(index)
  all_pids = sorted(index_dic)
  num_pids_per_batch = batch_size // num_instances
  batch_idxs_dict = defaultdict(list)
  for pid in all_pids:
    idxs = copy.deepcopy(index_dic[pid])
    if len(idxs) < num_instances:
      idxs = choice(idxs, num_instances)
    idxs = shuffle(idxs)
    batch_idxs = []
    for idx in idxs:
      batch_idxs.append(idx)
      if len(batch_idxs) == num_instances:
        batch_idxs_dict[pid].append(batch_idxs)
        batch_idxs = []
  avai_pids = copy.deepcopy(all_pids)
  final_idxs = []
  while len(avai_pids) >= num_pids_per_batch:
    selected_pids = sample(avai_pids, num_pids_per_batch)
    for pid in selected_pids:
      batch_idxs = batch_idxs_dict[pid].pop(0)
      final_idxs.extend(batch_idxs)
      if len(batch_idxs_dict[pid]) == 0:
        avai_pids.remove(pid)
  return final_idxs


def _labels(seed=0, classes=12):
  rng = np.random.default_rng(seed)
  return rng.permutation(np.repeat(np.arange(classes), rng.integers(1, 14, classes)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_equals_the_official_loop_on_the_same_draws(seed):
  labels = _labels(seed)
  sampler = IdentitySampler(labels, batch_size=12, num_instances=4, seed=5)
  for epoch in range(3):
    images = np.random.default_rng([5, epoch, 0])
    classes = np.random.default_rng([5, epoch, 1])
    expected = official_iter(
        labels.tolist(), 12, 4,
        choice=lambda idxs, k: list(images.choice(idxs, k, replace=True)),
        shuffle=lambda idxs: list(images.permutation(idxs)),
        sample=lambda avail, p: list(classes.choice(np.asarray(avail), p, replace=False)))
    plan = sampler.epoch_plan(epoch)
    assert plan.dtype == np.int64 and plan.shape[1] == 12
    np.testing.assert_array_equal(plan.reshape(-1), expected)
    assert sampler.epoch_lengths(epoch + 1)[epoch] == len(plan)


def test_every_image_once_and_batches_per_epoch_like_the_official_sampler():
  # Market-like: 80 ids with 1..30 images; P = 4, K = 4.
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(80), rng.integers(1, 31, 80))
  sampler = IdentitySampler(labels, batch_size=16, num_instances=4, seed=0)
  counts = np.bincount(labels)
  ours = []
  for epoch in range(20):
    plan = sampler.epoch_plan(epoch)
    ours.append(len(plan))
    for c in range(80):    # K consecutive slots per class, distinct images unless padded
      used = plan.reshape(-1, 4)[labels[plan.reshape(-1, 4)[:, 0]] == c]
      assert (labels[used] == c).all()
      if counts[c] >= 4:
        assert len(np.unique(used)) == used.size <= counts[c] // 4 * 4
  official = []
  for s in range(20):  # with its own random module
    r = random.Random(s)
    nr = np.random.default_rng(s)
    out = official_iter(labels.tolist(), 16, 4,
                        choice=lambda idxs, k: list(nr.choice(idxs, k, replace=True)),
                        shuffle=lambda idxs: (r.shuffle(idxs), idxs)[1], sample=r.sample)
    official.append(len(out) // 16)
  chunks = sum(max(1, n // 4) for n in counts)
  assert sampler.num_batches == chunks // 4
  # nearly every chunk is used (≈ all images), against C // P = 20 batches for the PK sampler
  assert min(ours) >= chunks // 4 - 15 and max(ours) <= chunks // 4
  assert abs(np.mean(ours) - np.mean(official)) < 3, (ours, official)
  assert sampler.epoch_lengths(20) == ours
