"""QAConv's class-memory objective (ECCV 2020; docs/methods/qaconv.md): one feature map per
training class, hard-overwritten after each step with the class's latest (detached) map; every
sample is scored against all memories and trained with a focal-weighted BCE, summed over the
filled memories (`train.memory_mask_invalid`, default) or over all of them (v1.0-eccv).

The in-batch objectives (QAConv-GS: pairwise BCE, triplet) are the shared ones of
`jaxreid.objectives`.
"""
import jax
import jax.numpy as jnp
import optax

from jaxreid.models import feature_map_size
from jaxreid.objectives import Objective, encode_for_training


def init_class_memory(num_classes: int, feature_shape: tuple[int, ...]) -> dict:
  """`features` [C, *feature_shape] zeros and a `valid` mask of classes seen so far."""
  return {"features": jnp.zeros((num_classes,) + tuple(feature_shape), jnp.float32),
          "valid": jnp.zeros((num_classes,), bool)}


def overwrite(memory: dict, features, labels) -> dict:
  """Writes each class's last occurrence in the batch into its slot (deterministic under
  duplicate labels); other slots are unchanged."""
  n = labels.shape[0]
  later_same = (labels[:, None] == labels[None, :]) & (jnp.arange(n)[None, :] > jnp.arange(n)[:, None])
  is_last = ~later_same.any(axis=1)
  num_classes = memory["valid"].shape[0]
  slots = jnp.where(is_last, labels, num_classes)  # out of range → dropped
  return {"features": memory["features"].at[slots].set(features.astype(jnp.float32), mode="drop"),
          "valid": memory["valid"].at[slots].set(True, mode="drop")}


def focal_memory_loss(logits, labels, valid, gamma: float = 2.0):
  """QAConv class-memory loss: focal-weighted BCE of each sample against every class memory.

  logits [B, C] against the memories, labels [B], valid [C] (the classes summed over: those
  whose memory is filled, or all of them for v1.0-eccv's unmasked sum). Summed over the valid
  classes, averaged over the batch.
  """
  targets = labels[:, None] == jnp.arange(logits.shape[1])[None, :]
  bce = optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype))
  prob = jax.nn.sigmoid(logits)
  weight = jnp.where(targets, 1.0 - prob, prob) ** gamma
  return jnp.mean(jnp.sum(jnp.where(valid[None, :], weight * bce, 0.0), axis=1))


def _memory_loss(model, variables, state, batch, train_cfg):
  maps, variables = encode_for_training(model, variables, batch["image"])
  labels, valid = batch["label"], state.memory["valid"]
  if not train_cfg.get("memory_mask_invalid", True):
    valid = jnp.ones_like(valid)   # v1.0-eccv: every class, unfilled (zero) memories included
  gallery = jax.lax.stop_gradient(state.memory["features"])
  logits, upd = model.apply(variables, maps, gallery, train=True, method="match",
                            mutable=["batch_stats"])
  value = focal_memory_loss(logits, labels, valid, train_cfg.focal_gamma)
  accuracy = jnp.mean(jnp.argmax(jnp.where(valid, logits, -jnp.inf), 1) == labels)
  return value, (upd["batch_stats"], jax.lax.stop_gradient(maps), {"accuracy": accuracy})


def _init_memory(config, params, num_classes: int, num_images: int, rng) -> dict:
  h, w = feature_map_size(config.model, config.data.height, config.data.width)
  return init_class_memory(num_classes, (h, w, config.model.neck))


CLASS_MEMORY = Objective(_memory_loss, _init_memory,
                         lambda memory, maps, batch, cfg: overwrite(memory, maps, batch["label"]))
