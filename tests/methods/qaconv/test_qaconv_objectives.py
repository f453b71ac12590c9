"""Losses and class memory against NumPy references written from the papers and docs/methods."""
import jax.numpy as jnp
import numpy as np

from jaxreid import objectives as losses
from jaxreid.methods.qaconv import objective as memory
from jaxreid.methods.qaconv.objective import focal_memory_loss


def np_bce(logits, targets):
  return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))


def test_focal_memory_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 9)) * 3
  labels = rng.integers(0, 9, size=6)
  valid = rng.random(9) > 0.3
  total = 0.0
  for i in range(6):
    for c in range(9):
      if not valid[c]:
        continue
      t = float(labels[i] == c)
      p = 1 / (1 + np.exp(-logits[i, c]))
      w = (1 - p) ** 2 if t else p ** 2
      total += w * np_bce(logits[i, c], t)
  expected = total / 6
  got = focal_memory_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                 jnp.asarray(valid), gamma=2.0)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_pairwise_bce_counts_self_pair_and_sums_columns():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 8)) * 4
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  targets = (labels[:, None] == labels[None, :]).astype(float)
  expected = np_bce(logits, targets).sum(1).mean()
  got = losses.pairwise_bce_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_triplet_is_batch_hard_on_scores():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(6, 6)) * 10
  labels = np.array([0, 0, 0, 1, 1, 2])   # anchor 5 has no positive → excluded
  per_anchor = []
  for i in range(6):
    pos = [logits[i, j] for j in range(6) if labels[j] == labels[i] and j != i]
    neg = [logits[i, j] for j in range(6) if labels[j] != labels[i]]
    if pos and neg:
      per_anchor.append(max(max(neg) - min(pos) + 16.0, 0.0))
  got = losses.triplet_score_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 16.0)
  np.testing.assert_allclose(float(got), np.mean(per_anchor), rtol=1e-5)


def test_class_memory_overwrites_with_last_occurrence():
  mem = memory.init_class_memory(5, (2, 1, 3))
  feats = jnp.arange(4 * 6, dtype=jnp.float32).reshape(4, 2, 1, 3)
  labels = jnp.array([3, 1, 3, 0])
  out = memory.overwrite(mem, feats, labels)
  np.testing.assert_array_equal(out["valid"], [True, True, False, True, False])
  np.testing.assert_array_equal(out["features"][3], feats[2])   # the later of the two 3s
  np.testing.assert_array_equal(out["features"][1], feats[1])
  np.testing.assert_array_equal(out["features"][0], feats[3])
  np.testing.assert_array_equal(out["features"][2], 0)
  # A second batch replaces (not averages) an existing slot and keeps the others.
  out2 = memory.overwrite(out, feats[:1] + 100, jnp.array([1]))
  np.testing.assert_array_equal(out2["features"][1], feats[0] + 100)
  np.testing.assert_array_equal(out2["features"][3], feats[2])


def _official_trainer_mean(per_anchor):
  """The official v2.1 trainer (reid/trainers.py, Trainer._forward): keep the finite per-anchor
  losses, then average them."""
  finite = np.isfinite(per_anchor)
  return per_anchor[finite].mean()


def _official_triplet(score, target, margin):
  """Transcription of the official v2.1 reid/loss/triplet_loss.py (per-anchor, reduction none)."""
  n = len(target)
  pair_labels = (target[:, None] == target[None, :]).astype(np.float64)
  eye = np.eye(n)
  with np.errstate(invalid="ignore"):
    min_pos = np.min(score * pair_labels + (1 - pair_labels + eye) * 1e15, axis=1)
    max_neg = np.max(score * (1 - pair_labels) - pair_labels * 1e15, axis=1)
    return np.maximum(0.0, -(min_pos - max_neg) + margin)      # MarginRankingLoss, y = 1


def _official_pairwise(score, target):
  """Transcription of the official v2.1 reid/loss/pairwise_matching_loss.py (per anchor)."""
  pair_labels = (target[:, None] == target[None, :]).astype(np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    return np_bce(score, pair_labels).sum(-1)


def test_non_finite_anchors_are_dropped_before_the_mean():
  import jax
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(4), 2)                  # a GS batch with K = 2
  for bad in (np.inf, -np.inf, np.nan):
    logits = rng.normal(size=(8, 8)) * 10
    logits[2, 5] = bad                                 # one anchor's row is poisoned
    for ours, official in (
        (lambda x: losses.triplet_score_loss(x, jnp.asarray(labels), 16.0),
         lambda x: _official_triplet(x, labels, 16.0)),
        (lambda x: losses.pairwise_bce_loss(x, jnp.asarray(labels)),
         lambda x: _official_pairwise(x, labels))):
      expected = _official_trainer_mean(official(logits))
      assert np.isfinite(expected)
      x = jnp.asarray(logits, jnp.float32)
      np.testing.assert_allclose(float(ours(x)), expected, rtol=1e-5)
      grad = np.asarray(jax.grad(ours)(x))
      assert np.isfinite(grad[np.arange(8) != 2]).all()   # the other anchors still learn
  # Without dropping, one poisoned anchor poisons the loss.
  assert not np.isfinite(float(losses.pairwise_bce_loss(jnp.asarray(logits, jnp.float32),
                                                        jnp.asarray(labels),
                                                        drop_non_finite=False)))
