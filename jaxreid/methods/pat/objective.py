"""PAT's training objective (paper Sec. 3.2–3.4; docs/methods/pat.md):

  loss = ID loss (label-smoothed CE, with part-guided soft labels, PSD)
       + soft-margin batch-hard triplet on the class token
       + pat.csl_weight · contrastive part loss (CSL) against a per-part memory bank.

The memory bank (train state `memory`): bank [3, num_images, D] of detached last-layer part
tokens, `filled` [num_images] and `labels` [num_images]. Each step first updates the slots of the
batch's images (an image's first visit stores its feature, later visits blend it with momentum
`pat.memory_momentum`: w ← (1 − m)·w + m·f, in batch order), then computes the loss against the
updated bank, as the official trainer does. Slots not yet filled take no part in the loss. With
`pat.prefill` (official) the bank starts from a pass of the initial model over one epoch of the
training loader (`prefill.py`); without it, the first epoch fills it.
"""
import jax
import jax.numpy as jnp
import optax

from jaxreid.objectives import Objective, cross_entropy_label_smooth, euclidean_distances


def update_bank(memory: dict, parts, index, labels, momentum: float) -> dict:
  """The memory after storing the batch's part features `parts` [B, 3, D] at slots `index` [B],
  one image after the other (a repeated image is blended twice, in order)."""
  parts = jax.lax.stop_gradient(parts).astype(jnp.float32)

  def body(i, mem):
    j = index[i]
    old = mem["bank"][:, j]
    new = jnp.where(mem["filled"][j], (1 - momentum) * old + momentum * parts[i], parts[i])
    return {"bank": mem["bank"].at[:, j].set(new), "filled": mem["filled"].at[j].set(True),
            "labels": mem["labels"].at[j].set(labels[i])}

  return jax.lax.fori_loop(0, parts.shape[0], body, memory)


def part_similarities(parts, bank, kind: str = "euclidean", scale: float = 0.02,
                      temperature: float = 0.02):
  """[3, B, M] similarities s of each batch part feature to each bank entry of its part:
  "euclidean" s = −scale·‖f − w‖² (the official PC_SCALE form), "cosine" s = cos(f, w) / τ (the
  paper's Eq. form)."""
  f = jnp.swapaxes(parts.astype(jnp.float32), 0, 1)                    # [3, B, D]
  if kind == "cosine":
    fn = f * jax.lax.rsqrt(jnp.maximum(jnp.sum(f * f, -1, keepdims=True), 1e-24))
    wn = bank * jax.lax.rsqrt(jnp.maximum(jnp.sum(bank * bank, -1, keepdims=True), 1e-24))
    return jnp.einsum("pbd,pmd->pbm", fn, wn) / temperature
  if kind != "euclidean":
    raise ValueError(f"pat.csl_similarity={kind!r} is unknown; use 'euclidean' or 'cosine'.")
  d2 = (jnp.sum(f * f, -1)[..., None] + jnp.sum(bank * bank, -1)[:, None, :]
        - 2.0 * jnp.einsum("pbd,pmd->pbm", f, bank))
  return -scale * d2


def csl_loss(parts, memory: dict, index, k: int = 10, kind: str = "euclidean",
             scale: float = 0.02, temperature: float = 0.02):
  """(loss, neighbours [B, 3k] bank slots, valid [B, 3k]): for each part and batch feature, the
  k most similar filled bank entries other than its own slot are the positives;
  loss = mean over parts and the batch of −log(Σ_pos exp(s) / Σ_all exp(s)) over the filled
  entries other than its own. Anchors without a usable entry count as 0."""
  s = part_similarities(parts, memory["bank"], kind, scale, temperature)  # [3, B, M]
  m = s.shape[-1]
  usable = memory["filled"][None, None, :] & (jnp.arange(m)[None, None, :]
                                              != index[None, :, None])
  s = jnp.where(usable, s, -jnp.inf)
  top, slots = jax.lax.top_k(s, min(k, m))                               # [3, B, k]
  valid = jnp.isfinite(top)
  pos = jax.nn.logsumexp(jnp.where(valid, top, -jnp.inf), axis=-1)
  all_ = jax.nn.logsumexp(s, axis=-1)
  per = jnp.where(valid.any(-1), all_ - pos, 0.0)                        # [3, B]
  b = parts.shape[0]
  neighbours = jnp.moveaxis(slots, 0, 1).reshape(b, -1)
  valid = jnp.moveaxis(valid, 0, 1).reshape(b, -1)
  return jnp.mean(per), neighbours, valid


def soft_labels(labels, neighbour_labels, valid, num_classes: int, lam: float):
  """PSD targets [B, C]: (1 − λ)·onehot(y) + λ·(histogram of the neighbours' ids) / (number of
  neighbours); λ·onehot(y) in place of the histogram for an anchor without neighbours."""
  onehot = jax.nn.one_hot(labels, num_classes)
  hist = jnp.sum(jax.nn.one_hot(neighbour_labels, num_classes) * valid[..., None], axis=1)
  count = valid.sum(-1, keepdims=True)
  hist = jnp.where(count > 0, hist / jnp.maximum(count, 1), onehot)
  return (1 - lam) * onehot + lam * hist


def id_loss(logits, labels, soft=None, epsilon: float = 0.1, alpha: float = 0.5):
  """(1 − α)·CE(label-smoothed y) + α·CE(soft targets); the smoothed CE alone without `soft`."""
  smooth = cross_entropy_label_smooth(logits, labels, epsilon)
  if soft is None:
    return smooth
  soft_ce = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), soft))
  return (1 - alpha) * smooth + alpha * soft_ce


def soft_margin_triplet(features, labels):
  """Batch-hard triplet with a soft margin (the official NO_MARGIN): mean of
  log(1 + exp(d(a, hardest positive) − d(a, hardest negative))) on Euclidean distances, the
  anchor itself counted among its positives."""
  d = euclidean_distances(features)
  same = labels[:, None] == labels[None, :]
  ap = jnp.max(jnp.where(same, d, -jnp.inf), axis=1)
  an = jnp.min(jnp.where(same, jnp.inf, d), axis=1)
  has_neg = (~same).any(1)
  per = jax.nn.softplus(ap - an)
  return jnp.sum(jnp.where(has_neg, per, 0.0)) / jnp.maximum(has_neg.sum(), 1)


def _loss(model, variables, state, batch, train_cfg):
  if "index" not in batch:
    raise ValueError("PAT's objective needs each image's dataset row in the batch ('index').")
  rng = jax.random.fold_in(state.rng, state.step)
  (cls, parts, logits), upd = model.apply(
      variables, batch["image"], method="train_outputs", mutable=["batch_stats"],
      rngs={"dropout": jax.random.fold_in(rng, 0), "mask": jax.random.fold_in(rng, 1)})
  labels, index = batch["label"], batch["index"]
  p = train_cfg.pat
  memory = update_bank(state.memory, parts, index, labels, p.memory_momentum)
  csl, neighbours, valid = csl_loss(parts, memory, index, p.k, p.csl_similarity, p.csl_scale,
                                    p.csl_temperature)
  soft = None
  if p.soft_labels:
    soft = soft_labels(labels, memory["labels"][neighbours], valid, logits.shape[-1],
                       p.soft_lambda)
  ident = id_loss(logits, labels, soft, train_cfg.label_smoothing, p.soft_weight)
  tri = soft_margin_triplet(cls, labels)
  value = ident + train_cfg.triplet_weight * tri + p.csl_weight * csl
  metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), "id_loss": ident,
             "triplet": tri, "csl": csl}
  return value, (upd["batch_stats"], memory, metrics)


def _init_memory(config, params, num_classes: int, num_images: int, rng) -> dict:
  """The part memory bank: one slot per training image."""
  n = int(num_images)
  dim = params["encoder"]["backbone"]["cls_token"].shape[-1]
  return {"bank": jnp.zeros((3, n, dim), jnp.float32), "filled": jnp.zeros((n,), bool),
          "labels": jnp.zeros((n,), jnp.int32)}


def _keep_updated(memory, aux, batch, train_cfg):
  return aux      # the bank as updated before the loss, in the same step


PAT = Objective(_loss, _init_memory, _keep_updated)   # the method adds `prepare` (pre-fill)
