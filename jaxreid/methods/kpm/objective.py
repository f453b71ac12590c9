"""KPM's training objective (paper Sec. 4.2): binary cross-entropy on image pairs sampled from a
PK batch at positives : negatives = 1 : `train.neg_ratio` (3 on Market-1501, 4 on CUHK03 and
DukeMTMC), each pair scored by the matcher alone (never the whole B×B matrix)."""
import jax
import jax.numpy as jnp
import optax

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
