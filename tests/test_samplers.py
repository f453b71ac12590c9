"""PK and graph sampler plans: batch composition, neighbours, determinism, argument checks."""
import numpy as np
import pytest

from jaxreid.data.samplers import GraphSampler, PKSampler


def _labels(num_classes=13, seed=0):
  """Classes with 1-7 images each (some below K), shuffled over the dataset."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), rng.integers(1, 8, num_classes))
  return rng.permutation(labels)


def _assert_k_per_class(batch, labels, k):
  classes, counts = np.unique(labels[batch], return_counts=True)
  assert (counts == k).all(), counts
  for j in range(0, len(batch), k):  # each class fills K consecutive slots
    assert len(set(labels[batch[j:j + k]].tolist())) == 1
  return classes


def test_pk_plan():
  labels = _labels()
  sampler = PKSampler(labels, batch_size=12, num_instances=4, seed=3)
  plan = sampler.epoch_plan(0)
  assert sampler.num_classes == 13
  assert plan.dtype == np.int64 and plan.shape == (13 // 3, 12) == (sampler.num_batches, 12)
  seen = []
  for batch in plan:
    seen += _assert_k_per_class(batch, labels, 4).tolist()
    assert len(set(labels[batch].tolist())) == 3
  assert len(seen) == len(set(seen))  # each class at most once per epoch
  counts = np.bincount(labels)
  for batch in plan:  # without replacement when a class has at least K images
    for c in set(labels[batch].tolist()):
      if counts[c] >= 4:
        assert len(set(batch[labels[batch] == c].tolist())) == 4
  np.testing.assert_array_equal(plan, PKSampler(labels, batch_size=12, num_instances=4,
                                                seed=3).epoch_plan(0))
  assert not np.array_equal(plan, sampler.epoch_plan(1))
  assert not np.array_equal(plan, PKSampler(labels, batch_size=12, num_instances=4,
                                            seed=4).epoch_plan(0))


def test_graph_sampler_plan():
  labels = _labels(num_classes=11, seed=1)
  c, batch_size, k = 11, 16, 4
  sampler = GraphSampler(labels, batch_size=batch_size, num_instances=k, seed=0)
  reps = sampler.representatives(0)
  assert reps.shape == (c,) and (labels[reps] == np.arange(c)).all()
  np.testing.assert_array_equal(reps, sampler.representatives(0))
  assert any(not np.array_equal(reps, sampler.representatives(e)) for e in range(1, 4))
  distance = np.random.default_rng(7).random((c, c))
  plan = sampler.epoch_plan(0, distance)
  assert plan.shape == (c, batch_size) and plan.dtype == np.int64 and sampler.num_batches == c
  leaders = labels[plan[:, -1]]                      # official layout: neighbours, then leader
  assert sorted(leaders.tolist()) == list(range(c))  # every class leads exactly one batch
  masked = distance + np.diag(np.full(c, np.inf))
  for batch, leader in zip(plan, leaders):
    _assert_k_per_class(batch, labels, k)
    members = labels[batch[::k]]
    assert members[-1] == leader
    expected = np.argsort(masked[leader])[:batch_size // k - 1]
    np.testing.assert_array_equal(members[:-1], expected)
  np.testing.assert_array_equal(plan, GraphSampler(labels, batch_size=batch_size, num_instances=k,
                                                   seed=0).epoch_plan(0, distance))
  assert not np.array_equal(plan, sampler.epoch_plan(1, distance))


def test_graph_sampler_cycles_through_each_class():
  labels = np.repeat(np.arange(4), 6)  # 6 images per class, each class used by every batch
  sampler = GraphSampler(labels, batch_size=16, num_instances=4, seed=0)
  plan = sampler.epoch_plan(0, np.zeros((4, 4)))
  for c in range(4):
    used = plan[labels[plan] == c]
    counts = np.bincount(used, minlength=len(labels))[labels == c]
    assert counts.min() >= 2 and counts.max() <= 3  # 16 draws over 6 images, round robin


def test_bad_arguments():
  labels = _labels()
  for cls in (PKSampler, GraphSampler):
    with pytest.raises(ValueError, match="multiple of num_instances"):
      cls(labels, batch_size=10, num_instances=4, seed=0)
    with pytest.raises(ValueError, match="only 13"):
      cls(labels, batch_size=4 * 14, num_instances=4, seed=0)
    with pytest.raises(ValueError, match="0..C-1"):
      cls(labels + 1, batch_size=8, num_instances=4, seed=0)
  with pytest.raises(ValueError, match="class_distance"):
    GraphSampler(labels, batch_size=8, num_instances=4, seed=0).epoch_plan(0, np.zeros((3, 3)))


def test_random_sampler_visits_every_image_once_per_epoch():
  from jaxreid.data.samplers import RandomSampler
  labels = np.repeat(np.arange(10), 5)
  sampler = RandomSampler(labels, batch_size=8, seed=3)
  plan = sampler.epoch_plan(0)
  assert plan.shape == (6, 8) and sampler.num_batches == 6
  assert len(np.unique(plan)) == 48                     # no repeats; 2 images dropped
  np.testing.assert_array_equal(plan, RandomSampler(labels, batch_size=8, seed=3).epoch_plan(0))
  assert not np.array_equal(plan, sampler.epoch_plan(1))
  with pytest.raises(ValueError, match="batch_size"):
    RandomSampler(labels, batch_size=51, seed=0)


class _OfficialGraphSampler:
  """Transcription of the official QAConv v2.1 reid/utils/data/graph_sampler.py (`__init__`,
  `graph_index`), with its randomness injected: `shuffle(c, n)` = the n-th shuffle of class c
  (n = 0 in __init__), `batch_order(epoch)` = the row permutation of `np.random.shuffle`; the
  distance is given instead of computed."""

  def __init__(self, labels, batch_size, num_instance, shuffle, batch_order):
    self.batch_size, self.num_instance = batch_size, num_instance
    self.shuffle, self.batch_order = shuffle, batch_order
    self.pids = sorted(set(labels.tolist()))
    self.num_pids = len(self.pids)
    self.shuffles = [0] * self.num_pids
    self.index_dic = {pid: list(shuffle(pid, 0)) for pid in self.pids}
    self.sam_pointer = [0] * self.num_pids

  def graph_index(self, epoch, dist):
    dist = dist + np.eye(self.num_pids) * 1e15
    topk = self.batch_size // self.num_instance - 1
    topk_index = np.argsort(dist, axis=1, kind="stable")[:, :topk]
    sam_index = []
    for i in range(self.num_pids):
      id_index = topk_index[i, :].tolist()
      id_index.append(i)
      index = []
      for j in id_index:
        pid = self.pids[j]
        img_index = self.index_dic[pid]
        len_p = len(img_index)
        index_p = []
        remain = self.num_instance
        while remain > 0:
          end = self.sam_pointer[j] + remain
          idx = img_index[self.sam_pointer[j]:end]
          index_p.extend(idx)
          remain -= len(idx)
          self.sam_pointer[j] = end
          if end >= len_p:
            self.shuffles[j] += 1                       # shuffle(img_index)
            img_index[:] = self.shuffle(pid, self.shuffles[j])
            self.sam_pointer[j] = 0
        assert len(index_p) == self.num_instance
        index.extend(index_p)
      sam_index.extend(index)
    sam_index = np.array(sam_index).reshape((-1, self.batch_size))
    return sam_index[self.batch_order(epoch)]             # np.random.shuffle(sam_index)


def test_graph_sampler_pointer_matches_official_across_epochs_and_resumes():
  labels = _labels(num_classes=9, seed=4)               # 1-7 images per class
  for batch_size, k in ((8, 2), (12, 4)):
    ours = GraphSampler(labels, batch_size=batch_size, num_instances=k, seed=5)
    official = _OfficialGraphSampler(
        labels, batch_size, k, shuffle=ours.class_order,
        batch_order=lambda e: np.random.default_rng([5, e, 1]).permutation(9))
    rng = np.random.default_rng(0)
    plans = []
    for epoch in range(4):
      distance = rng.random((9, 9))
      plan = ours.epoch_plan(epoch, distance)
      np.testing.assert_array_equal(plan, official.graph_index(epoch, distance))
      plans.append((distance, plan))
      if epoch == 1:
        saved = ours.state_dict()
    # Pointers carry over: the same distance in a later epoch does not restart each class.
    assert np.any(ours.state_dict()["pass"] > 0)
    resumed = GraphSampler(labels, batch_size=batch_size, num_instances=k, seed=5)
    resumed.load_state_dict(saved)
    for epoch in (2, 3):
      np.testing.assert_array_equal(resumed.epoch_plan(epoch, plans[epoch][0]), plans[epoch][1])
  with pytest.raises(ValueError, match="sampler state has 3 classes"):
    resumed.load_state_dict({"pass": np.zeros(3), "pointer": np.zeros(3)})
