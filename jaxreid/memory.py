"""Class memory for QAConv: one feature map per training class, hard-overwritten each step."""
import jax.numpy as jnp


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
