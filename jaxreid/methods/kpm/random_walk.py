"""The group-shuffling random walk of the KPM authors' release (Shen et al., "Deep Group-Shuffling
Random Walk for Person Re-identification", CVPR 2018; docs/methods/kpm.md): a probe's scores
against k gallery images refined by the gallery images' scores against each other.

For one (embed, channel group) pair with probe–gallery logits s [k] and gallery–gallery
"same" logits S [k, k]:
  A = softmax over each row of S with the diagonal left out (−∞),
  W = (1 − α)(I − α A)⁻¹,     s' = W s.
The walked scores of every (embed, group) pair are averaged. Each step is linear in s, so the
walk of the (same − different) logit difference equals the difference of the walked class logits.
"""
import jax
import jax.numpy as jnp


def walk_matrix(gallery_logits, alpha: float):
  """W = (1 − α)(I − α A)⁻¹, A = the off-diagonal row softmax of `gallery_logits` [..., k, k]."""
  k = gallery_logits.shape[-1]
  eye = jnp.eye(k, dtype=gallery_logits.dtype)
  a = jax.nn.softmax(jnp.where(eye > 0, -jnp.inf, gallery_logits), axis=-1)
  return (1.0 - alpha) * jnp.linalg.inv(eye - alpha * a)


def random_walk(probe_logits, gallery_logits, alpha: float):
  """Probe–gallery scores [..., k] after the walk over `gallery_logits` [..., k, k]: W s.
  Differentiable; with α = 0 the scores come back unchanged."""
  if alpha == 0:
    return probe_logits
  w = walk_matrix(gallery_logits, alpha)
  return jnp.einsum("...nm,...m->...n", w, probe_logits)


def walked_mean(probe_logits, gallery_logits, alpha: float):
  """The mean over the leading (embed × group) axis of the walked scores: probe_logits
  [E, ..., k], gallery_logits [E, ..., k, k] → [..., k]."""
  return jnp.mean(random_walk(probe_logits, gallery_logits, alpha), axis=0)
