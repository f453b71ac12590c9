"""KPM's training objectives (docs/methods/kpm.md).

"pairs" (paper Sec. 4.2): binary cross-entropy on image pairs sampled from the batch at
positives : negatives = 1 : `train.neg_ratio` (3 on Market-1501, 4 on CUHK03 and DukeMTMC), each
pair scored by the matcher alone (never the whole B×B matrix).

"random_walk" (the authors' release, `RandomWalkGrpShufTrainer`): the batch is groups of K (an
anchor, then K − 1 images of its id); the anchors are the probes, the rest the gallery. The
released variant's 2-way probe × gallery and gallery × gallery scores of every (embed, chunk)
are refined by a random walk over the gallery and trained with 2-class cross-entropy."""
import jax
import jax.numpy as jnp
import optax

from jaxreid.methods.kpm.random_walk import walk_matrix
from jaxreid.objectives import Objective, encode_for_training


def sample_pairs(labels, rng, positives: int, negatives: int):
  """(anchor, partner, target, weight), each [B · (positives + negatives)]: for every anchor,
  `positives` other images of its id and `negatives` images of other ids, drawn without
  replacement (top-k of uniform noise over the valid partners; at most B each). Where an anchor
  has fewer valid partners than asked for, the extra draws get weight 0."""
  b = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  eye = jnp.eye(b, dtype=bool)
  out = []
  for k, valid, target in ((positives, same & ~eye, 1.0), (negatives, ~same, 0.0)):
    k = min(k, b)
    if k == 0:
      continue
    noise = jax.random.uniform(jax.random.fold_in(rng, int(target)), (b, b))
    keys = jnp.where(valid, noise, -1.0)
    chosen_key, partner = jax.lax.top_k(keys, k)                        # [B, k]
    anchor = jnp.broadcast_to(jnp.arange(b)[:, None], partner.shape)
    out.append((anchor.ravel(), partner.ravel(), jnp.full(partner.size, target),
                (chosen_key >= 0).ravel().astype(jnp.float32)))
  return tuple(jnp.concatenate(parts) for parts in zip(*out))


def _pair_loss(model, variables, state, batch, train_cfg):
  maps, variables = encode_for_training(model, variables, batch["image"])
  rng = jax.random.fold_in(state.rng, state.step)
  positives = int(train_cfg.pos_per_anchor)
  anchor, partner, target, weight = sample_pairs(
      batch["label"], rng, positives, int(round(train_cfg.neg_ratio * positives)))
  logits, upd = model.apply(
      variables, maps[anchor], maps[partner], train=True,
      method=lambda m, x, y, train: m.matcher.pairs(x, y, train),
      mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(rng, 2)})
  losses = optax.sigmoid_binary_cross_entropy(logits, target)
  total = jnp.maximum(weight.sum(), 1.0)
  value = jnp.sum(losses * weight) / total
  accuracy = jnp.sum(((logits > 0) == (target > 0)) * weight) / total
  return value, (upd["batch_stats"], None, {"accuracy": accuracy})


SAMPLED_PAIRS = Objective(_pair_loss)


def random_walk(p2g, g2g, alpha: float):
  """The release's training random walk: W = (1 − α)(I − αA)⁻¹, A the row softmax of the
  gallery × gallery "same" scores (diagonal excluded; no gradient through A); both score
  arrays are mixed over their gallery axis: s'[…, g, :] = Σ_k W[g, k] s[…, k, :].
  p2g [P, G, 2], g2g [G, G, 2] → the same shapes."""
  w = walk_matrix(jax.lax.stop_gradient(g2g[..., 1]), alpha)
  return jnp.einsum("pkc,gk->pgc", p2g, w), jnp.einsum("akc,gk->agc", g2g, w)


def random_walk_loss(scores, labels, alpha: float):
  """(mean 2-class cross-entropy, accuracy) over every (embed, chunk) of `scores` (a list of
  (p2g [P, G, 2], g2g [G, G, 2])) after `random_walk`; labels [P, K] (probe first). Class 1 is
  "same id": targets [P + G, G] are probe × gallery, then gallery × gallery."""
  probe, gallery = labels[:, 0], labels[:, 1:].reshape(-1)
  targets = (jnp.concatenate([probe, gallery])[:, None] == gallery[None]).astype(jnp.int32)
  logits = jnp.concatenate([jnp.concatenate(random_walk(p, g, alpha)) for p, g in scores])
  targets = jnp.tile(targets, (len(scores), 1))
  value = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return value, jnp.mean(jnp.argmax(logits, -1) == targets)


def _random_walk_objective(model, variables, state, batch, train_cfg):
  maps, variables = encode_for_training(model, variables, batch["image"])
  k = int(train_cfg.pos_per_anchor) + 1
  if maps.shape[0] % k:
    raise ValueError(f"The random-walk loss needs batches of whole groups of K = {k} images; "
                     "data.batch_size must be a multiple of data.num_instances.")
  groups = maps.reshape(-1, k, *maps.shape[1:])
  probe, gallery = groups[:, 0], groups[:, 1:].reshape(-1, *maps.shape[1:])
  rng = jax.random.fold_in(state.rng, state.step)
  scores, upd = model.apply(
      variables, probe, gallery, train=True,
      method=lambda m, x, y, train: m.matcher.released_scores(x, y, train),
      mutable=["batch_stats"], rngs={"dropout": rng})
  value, accuracy = random_walk_loss(scores, batch["label"].reshape(-1, k), train_cfg.rw_alpha)
  return value, (upd["batch_stats"], None, {"accuracy": accuracy})


RANDOM_WALK = Objective(_random_walk_objective)
