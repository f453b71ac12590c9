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


def projected_similarities(probe, gallery, prior=None, gallery_chunk=None, probe_chunk=None,
                           offset=None):
  """Max-pooled, prior-weighted similarities of every probe × gallery pair and layer.

  probe [P, N, S, d], gallery [G, N, S, d] (the two sides of the products: both through fc1,
  or, as `TransMatcher` calls it, fc1(q)Wᵀ and the maps as they are), prior [N, S, S] weights
  (probe location × gallery location) or None → [P, G, N, 2, S]: index 0 of axis 3 maximises
  over gallery locations (one value per probe location), index 1 over probe locations.
  `offset` [P, N, S], if given, is added to every similarity of a probe location before the
  prior (fc1(q)·b, what folding fc1 onto the probe side leaves).

  The similarities of a block of `probe_chunk` probes and `gallery_chunk` gallery maps are one
  plain matrix product [p·S, d] × [d, g·S] per layer, max-pooled right away, so only one block
  of similarities exists at once. None picks the blocks by backend (`default_blocks`).
  """
  num_p, n, s, d = probe.shape
  num_g = gallery.shape[0]
  auto_p, auto_g = default_blocks(num_p)
  pc = max(1, min(probe_chunk or auto_p, num_p))
  gc = max(1, min(gallery_chunk or auto_g, num_g))
  if offset is None:
    offset = jnp.zeros((num_p, n, s), jnp.float32)

  def pad(x, multiple):
    extra = -x.shape[0] % multiple
    return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)]) if extra else x

  # Probe blocks laid out once, outside the gallery loop, as [blocks, N, pc·S, d].
  blocks = pad(probe, pc).reshape(-1, pc, n, s, d).transpose(0, 2, 1, 3, 4).reshape(
      -1, n, pc * s, d)
  offsets = pad(offset, pc).reshape(-1, pc, n, s).transpose(0, 2, 1, 3).reshape(-1, n, pc * s)

  def pooled_block(maps, rows, shift):  # [gc, N, S, d], [N, pc·S, d] → [pc, gc, N, 2, S]
    layers = []
    for i in range(n):
      sim = jnp.dot(rows[i], maps[:, i].reshape(-1, d).T, preferred_element_type=jnp.float32)
      sim = (sim + shift[i][:, None]).reshape(pc, s, gc, s)                  # [p, t, c, r]
      if prior is not None:
        sim = sim * prior[i][None, :, None, :]
      layers.append(jnp.stack([sim.max(axis=3).transpose(0, 2, 1), sim.max(axis=1)], axis=2))
    return jnp.stack(layers, axis=2)

  def pooled_chunk(maps):  # [gc, N, S, d] → [P', gc, N, 2, S]
    out = jax.lax.map(lambda x: pooled_block(maps, *x), (blocks, offsets))
    return out.reshape(-1, *out.shape[2:])

  pooled = jax.lax.map(pooled_chunk, pad(gallery, gc).reshape(-1, gc, n, s, d))
  pooled = pooled.transpose(1, 0, 2, 3, 4, 5).reshape(pooled.shape[1], -1, n, 2, s)
  return pooled[:num_p, :num_g]


def default_blocks(num_probes: int) -> tuple:
  """(probe, gallery) maps per similarity product. On a CPU, 8 × 8: each product's output
  ([8·S, 8·S] floats, 9.4 MB at 24×8) stays in the last-level cache, which ran the products
  about 15% faster than 32 × 8 blocks (a 38 MB output); accelerators take every probe at once.
  """
  if jax.default_backend() == "cpu":
    return 8, 8
  return num_probes, 8


def default_head_block(num_pairs: int) -> int:
  """Pairs per block of the decoder heads in evaluation: 128 on a CPU (their FC2 output,
  128·2·D floats, is 2 MB at D = 2048, about twice as fast as one pass over a tile), all at once
  on accelerators."""
  return 128 if jax.default_backend() == "cpu" else num_pairs


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
  gallery_chunk: Any = None   # maps per similarity product (None: `default_blocks`)
  probe_chunk: Any = None
  head_block: Any = None      # pairs per block of the heads in evaluation (None: by backend)
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
    offset = None
    if self.fc1:
      kernel = self.param("fc1_kernel", lambda k, s: jnp.stack(
          [xavier(key, s[1:]) for key in jax.random.split(k, n)]), (n, d, d))
      bias = self.param("fc1_bias", lambda k, s: jnp.stack(
          [torch_bias_init(d)(key, s[1:]) for key in jax.random.split(k, n)]), (n, d))
      # fc1(q)·fc1(k) = (fc1(q) Wᵀ)·k + fc1(q)·b: fc1 folded onto the probe side, so the
      # gallery maps enter the products as they are and are never projected (equal in exact
      # arithmetic; per tile only the probes are projected).
      q = jnp.einsum("bntd,nde->bnte", p, kernel) + bias[:, None]
      p = jnp.einsum("bnte,nde->bntd", q, kernel)
      offset = jnp.einsum("bnte,ne->bnt", q, bias)
    p, g = p.astype(self.dtype), g.astype(self.dtype)
    prior = None
    if self.prior_embed:
      r = self.param("prior", prior_init, (n, hw, hw))
      prior = jax.nn.sigmoid(r)
    pooled = projected_similarities(p, g, prior, self.gallery_chunk, self.probe_chunk,
                                    offset)                               # [P, G, N, 2, S]
    heads = [DecoderHead(self.ffn, self.bn1, self.mlp_head1, name=f"layers_{i}")
             for i in range(n)]
    layer_sum = lambda x: sum(head(x[..., i, :, :], train) for i, head in enumerate(heads))
    num_pairs = pooled.shape[0] * pooled.shape[1]
    block = min(self.head_block or default_head_block(num_pairs), num_pairs)
    if train or self.is_initializing() or block == num_pairs:   # BN batch statistics: all pairs
      score = layer_sum(pooled)
    else:   # per pair: the heads run on blocks of pairs, their [pairs, 2, D] hidden cache-sized
      pairs = pooled.reshape(num_pairs, *pooled.shape[2:])
      extra = -num_pairs % block
      pairs = jnp.concatenate([pairs, jnp.zeros((extra,) + pairs.shape[1:], pairs.dtype)])
      scan = nn.scan(lambda module, carry, x: (carry, layer_sum(x)),
                     variable_broadcast=("params", "batch_stats"), split_rngs={"params": False})
      _, score = scan(self, None, pairs.reshape(-1, block, *pairs.shape[1:]))
      score = score.reshape(-1)[:num_pairs].reshape(pooled.shape[:2])
    return ScalarBatchNorm(name="norm")(score, train)
