"""NFormer stage 2's training (docs/methods/nformer.md): sets of cached stage-1 features drawn
around a random centre, the NFormer head trained on them with label-smoothed CE + batch-hard
triplet + center loss (the centres by their own plain SGD), Adam at a constant lr."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxreid import objectives
from jaxreid.methods.nformer.model import NFormer
from jaxreid.nn.norms import l2_normalize
from jaxreid.train.state import TrainState


def set_shape(nf, n: int) -> tuple[int, int]:
  """(sets per step, rows per set): set_size clipped to the n training rows."""
  return int(nf.sets_per_step), min(int(nf.set_size), n)


def steps_per_epoch(nf, n: int) -> int:
  """The official epoch: n // 30 sets (nformer.sets_per_epoch_divisor), in steps of
  sets_per_step sets."""
  return max(1, n // (int(nf.sets_per_epoch_divisor) * int(nf.sets_per_step)))


def sample_sets(features: np.ndarray, labels: np.ndarray, *, sets: int, size: int, seed: int,
                step: int, unit: np.ndarray | None = None) -> dict:
  """The batch of training step `step`: `sets` sets of `size` rows, each drawn as the official
  NFormerDataset does: a random centre row, its ⌊size·(1+u)⌋ nearest rows by cosine
  similarity (u ~ U[0, 1), clipped to N), `size` of them at random, in random order.
  Deterministic in (seed, step), so a resumed run draws the same sets. `unit`: the
  L2-normalised `features`, when the caller has them (computed here otherwise).
  Returns {"features" float32 [sets, size, d], "labels" int32 [sets, size]}."""
  n = len(features)
  if not 1 <= size <= n:
    raise ValueError(f"set size {size} must lie in [1, {n}] (the number of training rows).")
  rng = np.random.default_rng([seed, step])
  if unit is None:
    unit = np.asarray(l2_normalize(features))
  rows = []
  for _ in range(sets):
    centre = int(rng.integers(n))
    candidates = min(n, int(size * (1 + rng.random())))
    nearest = np.argsort(-(unit @ unit[centre]), kind="stable")[:candidates]
    rows.append(rng.choice(nearest, size, replace=False))
  rows = np.stack(rows)
  return {"features": features[rows].astype(np.float32), "labels": labels[rows].astype(np.int32)}


def make_optimizer(nf) -> optax.GradientTransformation:
  """L2 weight decay (nformer.weight_decay; the official stage 2 has none) added to the
  gradient, then Adam at the constant nformer.lr."""
  return optax.chain(optax.add_decayed_weights(float(nf.weight_decay)), optax.adam(float(nf.lr)))


def create_state(head: NFormer, tx, sets: int, size: int, rng) -> TrainState:
  init_rng, center_rng, state_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((sets, size, head.dim), jnp.float32)
  variables = jax.jit(lambda r: head.init(r, dummy, r, train=True))(init_rng)
  params = variables["params"]
  centers = jax.random.normal(center_rng, (head.num_classes, head.dim))  # torch.randn, as stage 1
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                    memory={"centers": centers}, rng=state_rng)


def _sets_loss(head, variables, state, batch, nf):
  """Landmarks and dropout come from the step's key (fold_in(state.rng, step))."""
  key, drop_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
  (pre, _, logits), upd = head.apply(variables, batch["features"], key, train=True,
                                     mutable=["batch_stats"], rngs={"dropout": drop_key})
  pre, logits = pre.reshape(-1, head.dim), logits.reshape(-1, head.num_classes)
  labels = batch["labels"].reshape(-1)
  ce = objectives.cross_entropy_label_smooth(logits, labels, nf.label_smoothing)
  tri = objectives.batch_hard_triplet_loss(pre, labels, nf.triplet_margin)
  cen = objectives.center_loss(pre, labels, state.memory["centers"])
  metrics = {"ce": ce, "triplet": tri, "center": cen,
             "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  return ce + tri + nf.center_weight * cen, (upd["batch_stats"], jax.lax.stop_gradient(pre),
                                             metrics)


def _update_centers(memory, pre, batch, nf):
  """Plain SGD (nformer.center_lr) on the unweighted center loss, as reid-strong-baseline."""
  grad = jax.grad(objectives.center_loss, argnums=2)(pre, batch["labels"].reshape(-1),
                                                     memory["centers"])
  return {"centers": memory["centers"] - nf.center_lr * grad}


# Batches are `sample_sets` outputs; the state's memory holds the centres (`create_state`).
SETS = objectives.Objective(_sets_loss, update_memory=_update_centers)
