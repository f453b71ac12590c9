"""KPM's multi-gallery sampler (RandomMultipleGallerySampler) against brute-force checks."""
import numpy as np
import pytest

from configs import kpm
from jaxreid.data.samplers import MultiGallerySampler


def _split(num_classes=9, seed=0):
  """Labels and cameras: classes of 1-7 images, some in a single camera, one of a single image."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 8, num_classes)
  sizes[0] = 1
  labels = np.repeat(np.arange(num_classes), sizes)
  cams = rng.integers(0, 3, labels.size)
  cams[labels == 1] = 2                      # class 1: every image in one camera
  order = rng.permutation(labels.size)
  return labels[order], cams[order]


def _check_epoch(plan, labels, cams, k):
  """Brute force: each group of K is an anchor and K − 1 partners drawn as the official code."""
  groups = plan.reshape(-1, k)
  assert sorted(groups[:, 0].tolist()) == list(range(len(labels)))   # every image anchors once
  for anchor, *partners in groups.tolist():
    same = [j for j in range(len(labels)) if labels[j] == labels[anchor]]
    other_cams = [j for j in same if cams[j] != cams[anchor]]
    candidates = other_cams or [j for j in same if j != anchor] or [anchor]
    assert set(partners) <= set(candidates), (anchor, partners, candidates)
    if len(candidates) >= k:                                       # without replacement
      assert len(set(partners)) == k - 1


def test_every_image_anchors_once_with_partners_from_other_cameras():
  labels, cams = _split()
  k = 4
  sampler = MultiGallerySampler(labels, cams, batch_size=8, num_instances=k, seed=1)
  assert sampler.num_batches == len(labels) * k // 8
  # batch = one group: nothing dropped, the whole N × K sequence (the draws do not depend on B)
  whole = MultiGallerySampler(labels, cams, batch_size=k, num_instances=k, seed=1)
  for epoch in range(3):
    plan, full = sampler.epoch_plan(epoch), whole.epoch_plan(epoch)
    assert plan.shape == (sampler.num_batches, 8) and plan.dtype == np.int64
    assert full.size == len(labels) * k
    _check_epoch(full, labels, cams, k)
    np.testing.assert_array_equal(plan.reshape(-1), full.reshape(-1)[:plan.size])


def test_reproducible_and_resumable():
  labels, cams = _split(seed=3)
  make = lambda seed: MultiGallerySampler(labels, cams, batch_size=8, num_instances=4, seed=seed)
  a, b = make(5), make(5)
  np.testing.assert_array_equal(a.epoch_plan(2), b.epoch_plan(2))
  assert not np.array_equal(a.epoch_plan(2), a.epoch_plan(3))
  assert not np.array_equal(a.epoch_plan(2), make(6).epoch_plan(2))
  # a resumed run rebuilds the plan in a fresh sampler and skips the batches already done
  done = 3
  before = a.epoch_plan(1)
  np.testing.assert_array_equal(make(5).epoch_plan(1)[done:], before[done:])


def test_market_sized_epoch_holds_n_times_k_images():
  """kpm:market's sampler on Market-1501's training sizes (12,936 images, 751 ids, 6 cameras)."""
  rng = np.random.default_rng(0)
  labels = np.concatenate([np.arange(751), rng.integers(0, 751, 12936 - 751)])
  cams = rng.integers(0, 6, labels.size)
  c = kpm.get_config("market")
  assert c.data.sampler == "multi_gallery"
  sampler = MultiGallerySampler(labels, cams, batch_size=c.data.batch_size,
                                num_instances=c.data.num_instances, seed=0)
  k = c.data.num_instances
  whole = MultiGallerySampler(labels, cams, batch_size=k, num_instances=k, seed=0).epoch_plan(0)
  assert whole.size == 12936 * k                            # N × K images per epoch
  plan = sampler.epoch_plan(0)                              # in batches of 64, the last partial
  assert plan.shape == (12936 * k // 64, 64) == (808, 64)  # one (32 images) dropped
  np.testing.assert_array_equal(plan.reshape(-1), whole.reshape(-1)[:plan.size])
  groups = whole.reshape(-1, k)
  assert np.array_equal(np.sort(groups[:, 0]), np.arange(12936))
  assert (labels[groups] == labels[groups[:, :1]]).all()
  has_other = np.asarray([(cams[labels == labels[i]] != cams[i]).any() for i in groups[:, 0]])
  other = cams[groups[:, 1:]] != cams[groups[:, :1]]
  assert other[has_other].all()


def test_bad_arguments():
  labels, cams = _split()
  with pytest.raises(ValueError, match="camera ids"):
    MultiGallerySampler(labels, cams[:-1], batch_size=8, num_instances=4, seed=0)
  with pytest.raises(ValueError, match="num_instances"):
    MultiGallerySampler(labels, cams, batch_size=8, num_instances=1, seed=0)
