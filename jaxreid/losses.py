"""Training losses on pair logits (METHODS.md, QAConv)."""
import jax
import jax.numpy as jnp
import optax


def focal_memory_loss(logits, labels, valid, gamma: float = 2.0):
  """QAConv class-memory loss: focal-weighted BCE of each sample against every class memory.

  logits [B, C] against the memories, labels [B], valid [C] (classes whose memory is filled).
  Summed over valid classes, averaged over the batch.
  """
  targets = labels[:, None] == jnp.arange(logits.shape[1])[None, :]
  bce = optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype))
  prob = jax.nn.sigmoid(logits)
  weight = jnp.where(targets, 1.0 - prob, prob) ** gamma
  return jnp.mean(jnp.sum(jnp.where(valid[None, :], weight * bce, 0.0), axis=1))


def pairwise_bce_loss(logits, labels):
  """BCE over the B×B in-batch scores: same label (self included) is positive; sum over
  columns, mean over anchors."""
  targets = (labels[:, None] == labels[None, :]).astype(logits.dtype)
  return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=1))


def triplet_score_loss(logits, labels, margin: float = 16.0):
  """Batch-hard triplet on similarity scores: hardest positive (self excluded) vs hardest
  negative, hinge with `margin`, mean over anchors that have both."""
  same = labels[:, None] == labels[None, :]
  eye = jnp.eye(labels.shape[0], dtype=bool)
  pos = same & ~eye
  hardest_pos = jnp.min(jnp.where(pos, logits, jnp.inf), axis=1)
  hardest_neg = jnp.max(jnp.where(same, -jnp.inf, logits), axis=1)
  usable = pos.any(1) & (~same).any(1)
  loss = jnp.maximum(hardest_neg - hardest_pos + margin, 0.0)
  return jnp.sum(jnp.where(usable, loss, 0.0)) / jnp.maximum(usable.sum(), 1)


def pair_accuracy(logits, labels):
  """Fraction of in-batch pairs whose sign of the logit matches same/different id."""
  same = labels[:, None] == labels[None, :]
  return jnp.mean((logits > 0) == same)


def cross_entropy_label_smooth(logits, labels, epsilon: float = 0.1):
  """Cross-entropy against (1 - ε)·one-hot + ε/C (Szegedy et al.), mean over the batch."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), epsilon)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def euclidean_distances(x):
  """[B, D] → [B, B] Euclidean distances (clamped at 1e-12 before the square root, as
  reid-strong-baseline)."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, -1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
  return jnp.sqrt(jnp.maximum(d2, 1e-12))


def batch_hard_triplet_loss(features, labels, margin: float = 0.3):
  """Batch-hard triplet loss (Hermans et al.) on Euclidean distances of `features` [B, D]:
  `triplet_score_loss` on the negated distances."""
  return triplet_score_loss(-euclidean_distances(features), labels, margin)


def center_loss(features, labels, centers):
  """Center loss (Wen et al.): mean over the batch of ‖f_i − c_{y_i}‖², centers [C, D]."""
  diff = features.astype(jnp.float32) - centers[labels]
  return jnp.mean(jnp.sum(diff * diff, -1))
