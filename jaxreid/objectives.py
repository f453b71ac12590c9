"""Training objectives shared by several methods, and the losses they are made of.

An `Objective` tells the one training loop (`jaxreid.train`) how a method learns: `loss` runs the
model on a batch and returns the scalar loss with the new BN statistics, what `update_memory`
needs, and metrics (with "accuracy"); `init_memory` / `update_memory` keep any non-parameter state
(QAConv's class memory, the centre-loss centres) in the train state. Methods build their own
objectives from these parts (docs/methods/*.md says which each config uses).
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


def no_memory(config, params, num_classes: int, num_images: int, rng) -> dict:
  return {}


def keep_memory(memory, aux, batch, train_cfg):
  return memory


class Objective(NamedTuple):
  """loss(model, variables, state, batch, train_cfg) → (loss, (batch_stats, aux, metrics));
  init_memory(config, params, num_classes, num_images, rng) → memory (the training split has
    `num_classes` ids in `num_images` images);
  update_memory(memory, aux, batch, train_cfg) → memory (after the loss, in the same step);
  prepare(config, state, train_split, mesh, log) → state: once before the first step of a run
  that does not resume (PAT's pre-filled part memory), or None."""
  loss: Callable[..., Any]
  init_memory: Callable[..., Any] = no_memory
  update_memory: Callable[..., Any] = keep_memory
  prepare: Callable[..., Any] | None = None


def encode_for_training(model, variables, images):
  """(maps, variables with the updated batch_stats) of a training-mode `encode`."""
  maps, upd = model.apply(variables, images, train=True, method="encode", mutable=["batch_stats"])
  return maps, {"params": variables["params"], "batch_stats": upd["batch_stats"]}


def in_batch_pairs(score_loss: Callable) -> Objective:
  """Pairwise matchers trained on the batch against itself (graph or PK sampler): the B×B
  logits of `match(maps, maps)` under `score_loss(logits, labels, train_cfg)`."""

  def loss(model, variables, state, batch, train_cfg):
    maps, variables = encode_for_training(model, variables, batch["image"])
    logits, upd = model.apply(variables, maps, maps, train=True, method="match",
                              mutable=["batch_stats"])
    value = score_loss(logits, batch["label"], train_cfg)
    return value, (upd["batch_stats"], None,
                   {"accuracy": pair_accuracy(logits, batch["label"])})

  return Objective(loss)


PAIRWISE_BCE = in_batch_pairs(lambda logits, labels, cfg: pairwise_bce_loss(logits, labels))
PAIRWISE_TRIPLET = in_batch_pairs(
    lambda logits, labels, cfg: triplet_score_loss(logits, labels, cfg.triplet_margin))


def _embedding_loss(model, variables, state, batch, train_cfg):
  (features, logits), upd = model.apply(variables, batch["image"], method="train_outputs",
                                        mutable=["batch_stats"])
  labels = batch["label"]
  value = (cross_entropy_label_smooth(logits, labels, train_cfg.label_smoothing)
           + train_cfg.triplet_weight * batch_hard_triplet_loss(features, labels,
                                                                train_cfg.triplet_margin)
           + train_cfg.center_weight * center_loss(features, labels, state.memory["centers"]))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return value, (upd["batch_stats"], jax.lax.stop_gradient(features), {"accuracy": accuracy})


def _init_centers(config, params, num_classes: int, num_images: int, rng) -> dict:
  dim = params["head"]["bottleneck"]["scale"].shape[0]
  return {"centers": jax.random.normal(jax.random.fold_in(rng, 1), (num_classes, dim))}


def _update_centers(memory, features, batch, train_cfg):
  """Plain SGD at train.center_lr on the unweighted center loss (reid-strong-baseline)."""
  grad = jax.grad(center_loss, argnums=2)(features, batch["label"], memory["centers"])
  return {"centers": memory["centers"] - train_cfg.center_lr * grad}


# Classification with BNNeck (reid-strong-baseline): label-smoothed CE on the classifier +
# triplet_weight·batch-hard triplet + center_weight·center loss on the pre-BN vectors.
EMBEDDING = Objective(_embedding_loss, _init_centers, _update_centers)




def finite_mean(per_anchor, logits, keep=None):
  """Mean of the per-anchor losses of the anchors (rows of `logits`) whose scores and loss are
  all finite (and `keep`); 0 when there is none. The official QAConv-GS trainer drops non-finite
  per-anchor losses before the mean, and there a non-finite score makes its anchor's loss
  non-finite (docs/methods/qaconv.md)."""
  finite = jnp.isfinite(per_anchor) & jnp.isfinite(logits).all(axis=1)
  keep = finite if keep is None else keep & finite
  return jnp.sum(jnp.where(keep, per_anchor, 0.0)) / jnp.maximum(keep.sum(), 1)


def pairwise_bce_loss(logits, labels, drop_non_finite: bool = True):
  """BCE over the B×B in-batch scores: same label (self included) is positive; sum over
  columns, mean over anchors (over those whose loss is finite, with `drop_non_finite`)."""
  targets = (labels[:, None] == labels[None, :]).astype(logits.dtype)
  per_anchor = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=1)
  return finite_mean(per_anchor, logits) if drop_non_finite else jnp.mean(per_anchor)


def triplet_score_loss(logits, labels, margin: float = 16.0, drop_non_finite: bool = True):
  """Batch-hard triplet on similarity scores: hardest positive (self excluded) vs hardest
  negative, hinge with `margin`, mean over anchors that have both (and, with
  `drop_non_finite`, a finite loss)."""
  same = labels[:, None] == labels[None, :]
  eye = jnp.eye(labels.shape[0], dtype=bool)
  pos = same & ~eye
  hardest_pos = jnp.min(jnp.where(pos, logits, jnp.inf), axis=1)
  hardest_neg = jnp.max(jnp.where(same, -jnp.inf, logits), axis=1)
  usable = pos.any(1) & (~same).any(1)
  loss = jnp.maximum(hardest_neg - hardest_pos + margin, 0.0)
  if drop_non_finite:
    return finite_mean(loss, logits, usable)
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
  return triplet_score_loss(-euclidean_distances(features), labels, margin,
                            drop_non_finite=False)


def center_loss(features, labels, centers):
  """Center loss (Wen et al.): mean over the batch of ‖f_i − c_{y_i}‖², centers [C, D]."""
  diff = features.astype(jnp.float32) - centers[labels]
  return jnp.mean(jnp.sum(diff * diff, -1))
