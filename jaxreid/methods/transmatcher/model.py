"""TransMatcher's matcher (Liao & Shao, NeurIPS 2021; docs/methods/transmatcher.md).

The feature side is the shared `models.TransformerMapEncoder` (post-LN encoder layers of
`nn.transformer`, no positional encoding). Matcher (`TransMatcher`): for decoder layer n,
S_n = fc1(q_n)·fc1(k_n)ᵀ ⊙ sigmoid(R_n) → max over gallery and over probe locations → per
direction BN1 → FC2 (S→D) → BN2 → ReLU → FC3 (D→1) → sum of directions → BN3; the layer scores
are summed and normalised by a final scalar BN.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid.nn.norms import FeatureBatchNorm, ScalarBatchNorm
from jaxreid.nn.transformer import torch_bias_init, xavier


def prior_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform of R_n as the official code stores it, a [1, 1, S, S] tensor: PyTorch counts
  fan_in = fan_out = S·S there, so the bound is √3 / S (sigmoid(R_n) ≈ 0.5 at the start)."""
  bound = math.sqrt(6.0 / (2 * shape[-1] * shape[-2]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def projected_similarities(probe, gallery, prior=None, gallery_chunk: int = 8):
  """Max-pooled, prior-weighted similarities of every probe × gallery pair and layer.

  probe [P, N, S, d], gallery [G, N, S, d] (already through fc1), prior [N, S, S] weights
  (probe location × gallery location) or None → [P, G, N, 2, S]: index 0 of axis 3 maximises
  over gallery locations (one value per probe location), index 1 over probe locations.

  Per layer the similarities of a gallery chunk are one plain matrix product
  [P·S, d] × [d, chunk·S] on a probe block laid out once, outside the loop (a batched product
  over the layer axis made XLA transpose the probes for every chunk); only [P, S, chunk, S]
  similarities exist at once.
  """
  num_p, n, s, d = probe.shape
  num_g = gallery.shape[0]
  chunk = max(1, min(gallery_chunk, num_g))
  queries = [probe[:, i].reshape(num_p * s, d) for i in range(n)]

  def pooled_chunk(maps):  # [chunk, N, S, d] → [P, chunk, N, 2, S]
    layers = []
    for i in range(n):
      sim = jnp.dot(queries[i], maps[:, i].reshape(-1, d).T,
                    preferred_element_type=jnp.float32).reshape(num_p, s, -1, s)  # [P, t, c, r]
      if prior is not None:
        sim = sim * prior[i][None, :, None, :]
      layers.append(jnp.stack([sim.max(axis=3).transpose(0, 2, 1), sim.max(axis=1)], axis=2))
    return jnp.stack(layers, axis=2)

  pad = -num_g % chunk
  if pad:
    gallery = jnp.concatenate([gallery, jnp.zeros((pad,) + gallery.shape[1:], gallery.dtype)])
  pooled = jax.lax.map(pooled_chunk, gallery.reshape(-1, chunk, n, s, d))  # [G/c, P, c, N, 2, S]
  pooled = pooled.transpose(1, 0, 2, 3, 4, 5).reshape(num_p, -1, n, 2, s)
  return pooled[:, :num_g]


def correspondences(probe, gallery, fc1_kernel=None, fc1_bias=None, prior_logits=None):
  """Per decoder layer argmax locations of both max-poolings (flat y*w+x), for drawing matches.

  probe [P, N, h, w, d] (or [P, N, S, d]) and gallery [G, N, …] are the encoder's maps;
  `fc1_kernel` [N, d, d] / `fc1_bias` [N, d] the matcher's fc1 (None: `fc1` off) and
  `prior_logits` R [N, S, S] (probe location × gallery location; None: `prior_embed` off), i.e.
  S_n = fc1(q_n)·fc1(k_n)ᵀ ⊙ sigmoid(R_n) as in `TransMatcher`. Returns a dict of arrays
  [N, P, G, S]: `probe_to_gallery` (best gallery location of each probe location),
  `gallery_to_probe`, and the matching (prior-weighted) similarities `*_score`.
  """
  n = probe.shape[1]
  p = probe.reshape(probe.shape[0], n, -1, probe.shape[-1]).astype(jnp.float32)
  g = gallery.reshape(gallery.shape[0], n, -1, gallery.shape[-1]).astype(jnp.float32)
  if fc1_kernel is not None:
    project = lambda x: jnp.einsum("bntd,nde->bnte", x, fc1_kernel) + fc1_bias[:, None]
    p, g = project(p), project(g)
  s = jnp.einsum("pntd,gnrd->npgtr", p, g, preferred_element_type=jnp.float32)
  if prior_logits is not None:
    s = s * jax.nn.sigmoid(prior_logits)[:, None, None]   # [N, 1, 1, t, r]
  return {"probe_to_gallery": s.argmax(4), "probe_to_gallery_score": s.max(4),
          "gallery_to_probe": s.argmax(3), "gallery_to_probe_score": s.max(3)}


class DecoderHead(nn.Module):
  """BN1 → [FC2 (S→D) → BN2 → ReLU] → FC3 (→1) per direction; directions summed → BN3."""
  ffn: int = 2048
  bn1: bool = True
  mlp_head1: bool = True

  @nn.compact
  def __call__(self, pooled, train: bool):  # [P, G, 2, S] → [P, G]
    x = ScalarBatchNorm(name="bn1")(pooled, train) if self.bn1 else pooled
    s = x.shape[-1]
    if self.mlp_head1:
      x = nn.Dense(self.ffn, kernel_init=xavier, bias_init=torch_bias_init(s), name="fc2")(x)
      x = nn.relu(FeatureBatchNorm(name="bn2")(x, train))
    fan_in = x.shape[-1]
    x = nn.Dense(1, kernel_init=xavier, bias_init=torch_bias_init(fan_in), name="fc3")(x)
    return ScalarBatchNorm(name="bn3")(x[..., 0].sum(-1), train)


class TransMatcher(nn.Module):
  """Pair logits [P, G] from stacked layer maps [P, N, h, w, d] and [G, N, h, w, d].

  Switches (paper Table 3): `fc1` shared Linear(d, d) on both sides; `bn1` scalar BN after the
  max-pooling; `mlp_head1` FC2+BN2+ReLU (off: FC3 reads the S pooled values); `prior_embed`
  the learned prior R_n [S, S] (probe location × gallery location) weighting S_n by sigmoid(R_n).
  Every ≥2-D parameter is xavier-uniform initialised (R_n: see `prior_init`); biases as PyTorch.
  """
  height: int
  width: int
  num_layers: int = 3
  ffn: int = 2048
  fc1: bool = True
  bn1: bool = True
  mlp_head1: bool = True
  prior_embed: bool = True
  gallery_chunk: int = 8
  dtype: Any = jnp.float32   # inputs of the S×S products (accumulated in float32)

  @nn.compact
  def __call__(self, probe, gallery, train: bool = False):
    hw, n = self.height * self.width, self.num_layers
    expected = (n, self.height, self.width)
    if probe.ndim != 5 or probe.shape[1:4] != expected or gallery.shape[1:] != probe.shape[1:]:
      raise ValueError(f"TransMatcher was built for maps [B, {n}, {self.height}, {self.width}, d];"
                       f" got probe {probe.shape} and gallery {gallery.shape}.")
    d = probe.shape[-1]
    p = probe.reshape(probe.shape[0], n, hw, d).astype(jnp.float32)
    g = gallery.reshape(gallery.shape[0], n, hw, d).astype(jnp.float32)
    if self.fc1:  # one projection per map and layer, not per pair
      kernel = self.param("fc1_kernel", lambda k, s: jnp.stack(
          [xavier(key, s[1:]) for key in jax.random.split(k, n)]), (n, d, d))
      bias = self.param("fc1_bias", lambda k, s: jnp.stack(
          [torch_bias_init(d)(key, s[1:]) for key in jax.random.split(k, n)]), (n, d))
      project = lambda x: jnp.einsum("bntd,nde->bnte", x, kernel) + bias[:, None]
      p, g = project(p), project(g)
    p, g = p.astype(self.dtype), g.astype(self.dtype)
    prior = None
    if self.prior_embed:
      r = self.param("prior", prior_init, (n, hw, hw))
      prior = jax.nn.sigmoid(r)
    pooled = projected_similarities(p, g, prior, self.gallery_chunk)   # [P, G, N, 2, S]
    score = 0.0
    for i in range(n):
      score = score + DecoderHead(self.ffn, self.bn1, self.mlp_head1,
                                  name=f"layers_{i}")(pooled[:, :, i], train)
    return ScalarBatchNorm(name="norm")(score, train)
