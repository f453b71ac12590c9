"""PK and graph sampler plans: batch composition, neighbours, determinism, argument checks."""
import numpy as np
import pytest

from jaxreid.data.samplers import GraphSampler, PKSampler, rerank_graph_distance


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


def _official_random_index(labels, batch_size, num_instance, rng):
  """Transcription of official QAConv v2.0 GraphSampler.random_index, with its randomness from
  `rng` (np.random.choice → rng.choice, shuffle → rng.permutation, np.random.shuffle of the
  rows → a row permutation), then its DataLoader's batches (the last one may be partial)."""
  sam_index = []
  for pid in sorted(set(labels.tolist())):
    index = np.flatnonzero(labels == pid).tolist()      # index_dic[pid].copy()
    batches = len(index) // num_instance
    if batches == 0:
      more = rng.choice(index, size=num_instance - len(index), replace=True)
      index.extend(more)
      batches = 1
    index = rng.permutation(index).tolist()              # shuffle(index)
    if batches > batch_size:
      index = index[:batch_size * num_instance]
    else:
      index = index[:batches * num_instance]
    sam_index.extend(index)
  sam_index = np.array(sam_index)
  sam_index = sam_index.reshape((-1, num_instance))
  sam_index = sam_index[rng.permutation(len(sam_index))]  # np.random.shuffle(sam_index)
  sam_index = list(sam_index.flatten())
  return [sam_index[i:i + batch_size] for i in range(0, len(sam_index), batch_size)]


def test_graph_sampler_pre_epoch_is_official_random_index():
  rng = np.random.default_rng(11)
  labels = rng.permutation(np.repeat(np.arange(10), rng.integers(1, 13, 10)))  # 1-12 images
  for batch_size, k in ((4, 2), (8, 4), (12, 3)):          # (4, 2): 4-chunk cap binds at ≥ 10
    sampler = GraphSampler(labels, batch_size=batch_size, num_instances=k, seed=2, pre_epochs=2)
    before = sampler.state_dict()
    for epoch in range(2):
      assert not sampler.needs_distance(epoch)
      plan = sampler.epoch_plan(epoch)
      official = _official_random_index(labels, batch_size, k,
                                        np.random.default_rng([2, epoch, 3]))
      full = [b for b in official if len(b) == batch_size]
      assert len(official) - len(full) <= 1                  # ours drops the partial last batch
      np.testing.assert_array_equal(plan, np.asarray(full, np.int64))
      assert sampler.epoch_lengths(3)[epoch] == len(plan)
      # Structure: chunks of K of one class; per class min(⌊n/K⌋ or 1, batch_size) chunks.
      chunks = np.concatenate(official).reshape(-1, k)
      assert all(len(set(labels[ch].tolist())) == 1 for ch in chunks)
      counts = np.bincount(labels[chunks[:, 0]], minlength=10)
      sizes = np.bincount(labels, minlength=10)
      np.testing.assert_array_equal(counts, np.minimum(np.maximum(1, sizes // k), batch_size))
      for c in np.flatnonzero(sizes >= k):                 # no image twice within a class
        taken = chunks[labels[chunks[:, 0]] == c].ravel()
        assert len(set(taken.tolist())) == len(taken)
    assert not np.array_equal(sampler.epoch_plan(0), sampler.epoch_plan(1))
    # The random index leaves the per-class pointers alone (as official random_index does).
    for key in before:
      np.testing.assert_array_equal(sampler.state_dict()[key], before[key])
    assert sampler.needs_distance(2) and sampler.epoch_plan(2, rng.random((10, 10))).shape == (
        10, batch_size)
    assert sampler.epoch_lengths(3)[2] == 10
  with pytest.raises(ValueError, match="graph epoch"):
    GraphSampler(labels, batch_size=4, num_instances=2, seed=0, pre_epochs=1).epoch_plan(1)


def test_graph_sampler_pre_epochs_keep_the_graph_epochs_of_the_official_sampler():
  """After v2.0's pre-epoch, the graph epochs draw as the official sampler (pointers from 0)."""
  labels = _labels(num_classes=9, seed=4)
  ours = GraphSampler(labels, batch_size=8, num_instances=2, seed=5, pre_epochs=1)
  official = _OfficialGraphSampler(
      labels, 8, 2, shuffle=ours.class_order,
      batch_order=lambda e: np.random.default_rng([5, e, 1]).permutation(9))
  ours.epoch_plan(0)
  rng = np.random.default_rng(1)
  for epoch in (1, 2, 3):
    distance = rng.random((9, 9))
    np.testing.assert_array_equal(ours.epoch_plan(epoch, distance),
                                  official.graph_index(epoch, distance))


def _official_reranking(dist, query_num, k1=20, k2=6, lamda_value=0.3):
  """Transcription of official QAConv v2.0 reid/evaluators.py `reranking` (NumPy input; argsort
  made stable so that ties, which the doubled matrix is full of, rank in index order)."""
  original_dist = dist
  all_num = original_dist.shape[0]
  original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
  V = np.zeros_like(original_dist).astype(np.float16)
  initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
  for i in range(all_num):
    forward_k_neigh_index = initial_rank[i, :k1 + 1]
    backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
    fi = np.where(backward_k_neigh_index == i)[0]
    k_reciprocal_index = forward_k_neigh_index[fi]
    k_reciprocal_expansion_index = k_reciprocal_index
    for j in range(len(k_reciprocal_index)):
      candidate = k_reciprocal_index[j]
      candidate_forward_k_neigh_index = initial_rank[candidate, :int(np.around(k1 / 2)) + 1]
      candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index,
                                                      :int(np.around(k1 / 2)) + 1]
      fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
      candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
      if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
          candidate_k_reciprocal_index):
        k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                 candidate_k_reciprocal_index)
    k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
    weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
    V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)
  original_dist = original_dist[:query_num, ]
  if k2 != 1:
    V_qe = np.zeros_like(V, dtype=np.float16)
    for i in range(all_num):
      V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
    V = V_qe
  invIndex = []
  for i in range(all_num):
    invIndex.append(np.where(V[:, i] != 0)[0])
  jaccard_dist = np.zeros_like(original_dist, dtype=np.float16)
  for i in range(query_num):
    temp_min = np.zeros(shape=[1, all_num], dtype=np.float16)
    indNonZero = np.where(V[i, :] != 0)[0]
    indImages = [invIndex[ind] for ind in indNonZero]
    for j in range(len(indNonZero)):
      temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
          V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
    jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
  final_dist = jaccard_dist * (1 - lamda_value) + original_dist * lamda_value
  return final_dist[:query_num, query_num:]


def _official_graph_distance(score):
  """v2.0 GraphSampler.calc_distance: pairwise_distance, doubled to 2C × 2C, re-ranked."""
  dist = (1 - 1 / (1 + np.exp(-score / 10))).astype(np.float32)
  dist = np.concatenate((dist, dist))
  dist = np.concatenate((dist, dist), axis=1)
  return _official_reranking(dist, len(score))


@pytest.mark.parametrize("c", [12, 40])
def test_rerank_graph_distance_is_official_v20_reranking(c):
  score = np.random.default_rng(c).normal(0, 20, (c, c)).astype(np.float32)   # not symmetric
  distance = (1 - 1 / (1 + np.exp(-score / 10))).astype(np.float32)
  ours = rerank_graph_distance(distance)
  official = _official_graph_distance(score)
  assert ours.shape == (c, c) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, official)
  sampler = GraphSampler(np.repeat(np.arange(c), 2), batch_size=16, num_instances=2, seed=0)
  np.testing.assert_array_equal(sampler.neighbours(ours), sampler.neighbours(official))
  # Re-ranking changes the graph (else this test could not tell it was applied).
  assert not np.array_equal(sampler.neighbours(ours), sampler.neighbours(distance))


def test_plan_reranks_the_graph_as_official_v20():
  """GraphSampler.plan with rerank (data.gs_rerank): the batches of official v2.0 graph_index
  on the re-ranked distance of the representatives' scores; pre-epochs score nothing."""
  c, batch_size, k = 14, 8, 2
  labels = _labels(num_classes=c, seed=3)
  scores = np.random.default_rng(5).normal(0, 20, (c, c)).astype(np.float32)
  calls = []

  def score(indices):
    calls.append(indices)
    return scores.copy()

  ours = GraphSampler(labels, batch_size=batch_size, num_instances=k, seed=5, pre_epochs=1,
                      rerank=True)
  official = _OfficialGraphSampler(
      labels, batch_size, k, shuffle=ours.class_order,
      batch_order=lambda e: np.random.default_rng([5, e, 1]).permutation(c))
  plan = ours.plan(0, score)
  assert not calls and plan.shape == (ours.epoch_lengths(1)[0], batch_size)
  for epoch in (1, 2):
    plan = ours.plan(epoch, score)
    np.testing.assert_array_equal(calls[-1], ours.representatives(epoch))
    np.testing.assert_array_equal(plan, official.graph_index(epoch,
                                                             _official_graph_distance(scores)))
  plans = [GraphSampler(labels, batch_size=batch_size, num_instances=k, seed=5, pre_epochs=1,
                        rerank=rerank).plan(1, score)
           for rerank in (True, False)]        # without re-ranking (−score): another graph
  assert not np.array_equal(*plans)


def test_v20_settings_train_as_official_main_gs():
  from configs import qaconv_gs
  from jaxreid.data.samplers import make_sampler
  for setting in ("market_v20", "msmt17_all_v20"):
    c = qaconv_gs.get_config(setting)
    assert c.model.neck_bn and c.data.gs_pre_epochs == 1 and c.data.gs_rerank
  for setting in ("synthetic", "market", "msmt17_all"):
    c = qaconv_gs.get_config(setting)
    assert not c.model.neck_bn and c.data.gs_pre_epochs == 0 and not c.data.gs_rerank
  c = qaconv_gs.get_config("market_v20")
  split = type("Split", (), {"labels": _labels(num_classes=20, seed=0)})()
  c.data.batch_size, c.data.num_instances = 8, 2
  sampler = make_sampler(c, split)
  assert sampler.pre_epochs == 1 and not sampler.needs_distance(0) and sampler.needs_distance(1)
  assert sampler.rerank


def test_every_sampler_keeps_the_loop_protocol():
  """What the training loop asks of each `data.sampler`: `plan` (scores asked for only by the
  graph sampler, of the images it names), one plan of `epoch_lengths` rows per epoch, and a
  state that restores the same next plan."""
  import ml_collections
  from jaxreid.data.samplers import Sampler, make_sampler
  labels = _labels(num_classes=10, seed=2)
  split = type("Split", (), {"labels": labels, "cams": np.arange(len(labels)) % 3})()
  for name in ("random", "pk", "identity", "multi_gallery", "gs"):
    config = ml_collections.ConfigDict(dict(seed=1, data=dict(sampler=name, batch_size=8,
                                                             num_instances=2)))
    sampler, asked = make_sampler(config, split), []

    def score(indices):
      asked.append(indices)
      return -np.abs(np.subtract.outer(indices, indices)).astype(np.float32)

    assert isinstance(sampler, Sampler)
    lengths = sampler.epoch_lengths(2)
    state = sampler.state_dict()
    plans = [sampler.plan(epoch, score) for epoch in (0, 1)]
    assert [p.shape for p in plans] == [(n, 8) for n in lengths], name
    assert bool(asked) == (name == "gs"), name
    sampler.load_state_dict(state)
    np.testing.assert_array_equal(sampler.plan(0, score), plans[0])
