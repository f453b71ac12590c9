"""Normalisations: L2 (per vector / per map location), cosine similarity, and BatchNorm in
PyTorch's convention (momentum 0.1, unbiased running variance) for official-checkpoint parity."""
import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x, axis: int = -1):
  """x / ‖x‖ along `axis` in float32 (‖x‖ floored at 1e-12, torch.nn.functional.normalize)."""
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True), 1e-24))


def cosine_similarity(a, b):
  """[P, D] × [G, D] → [P, G] cosine similarities."""
  return l2_normalize(a) @ l2_normalize(b).T


def _torch_batch_norm(module: nn.Module, x, train: bool, shape: tuple, axes):
  """Shared body of the two BatchNorms below: statistics over `axes`, parameters of `shape`."""
  scale = module.param("scale", nn.initializers.ones, shape, jnp.float32)
  bias = module.param("bias", nn.initializers.zeros, shape, jnp.float32)
  ra_mean = module.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
  ra_var = module.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
  x32 = x.astype(jnp.float32)
  if train:
    mean = jnp.mean(x32, axes)
    var = jnp.mean(jnp.square(x32 - mean), axes)
    if not module.is_initializing():
      n = x.size // mean.size
      ra_mean.value = (1 - module.momentum) * ra_mean.value + module.momentum * mean
      ra_var.value = ((1 - module.momentum) * ra_var.value
                      + module.momentum * var * n / max(n - 1, 1))
  else:
    mean, var = ra_mean.value, ra_var.value
    if axes is None:
      mean, var = mean[0], var[0]
  s, b = (scale[0], bias[0]) if axes is None else (scale, bias)
  return ((x32 - mean) * jax.lax.rsqrt(var + module.epsilon) * s + b).astype(x.dtype)


class ScalarBatchNorm(nn.Module):
  """BatchNorm1d(1) applied to every element: one mean/var over the whole input (QAConv's and
  TransMatcher's score normalisations)."""
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    return _torch_batch_norm(self, x, train, (1,), None)


class FeatureBatchNorm(nn.Module):
  """BatchNorm1d(D) over the last axis."""
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    return _torch_batch_norm(self, x, train, (x.shape[-1],), tuple(range(x.ndim - 1)))
