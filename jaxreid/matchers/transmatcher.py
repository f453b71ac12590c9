"""TransMatcher: Transformer encoders on the feature map + a simplified matching decoder
(METHODS.md, TransMatcher; Liao & Shao, NeurIPS 2021).

Feature side (`TransformerEncoderLayer`, used by `models.TransformerMapEncoder`): post-LN encoder
layers without positional encoding. Matcher side (`TransMatcher`): for decoder layer n,
S_n = fc1(q_n)·fc1(k_n)ᵀ ⊙ sigmoid(R_n) → max over gallery and over probe locations → per
direction BN1 → FC2 (S→D) → BN2 → ReLU → FC3 (D→1) → sum of directions → BN3; the layer scores
are summed and normalised by a final scalar BN.

Also the plain Transformer layers the paper's Table 2 baselines share: `Attention` and the post-LN
`TransformerDecoderLayer` (Transformer-Cross, the vanilla Transformer's learned-query decoder).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid.matchers.qaconv import ScalarBatchNorm

xavier = nn.initializers.xavier_uniform()


def prior_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform of R_n as the official code stores it, a [1, 1, S, S] tensor: PyTorch counts
  fan_in = fan_out = S·S there, so the bound is √3 / S (sigmoid(R_n) ≈ 0.5 at the start)."""
  bound = math.sqrt(6.0 / (2 * shape[-1] * shape[-2]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int):
  """PyTorch's default Linear bias init: U(-1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def dense_layer(features, fan_in, dtype, name, zero_bias=False):
  """nn.Dense with xavier-uniform kernel and PyTorch's Linear bias init (or a zero bias, as the
  attention projections of torch nn.MultiheadAttention)."""
  bias = nn.initializers.zeros if zero_bias else torch_bias_init(fan_in)
  return nn.Dense(features, kernel_init=xavier, bias_init=bias, dtype=dtype, name=name)


class FeatureBatchNorm(nn.Module):
  """BatchNorm1d(D) over the last axis, PyTorch convention (momentum 0.1, unbiased running var)."""
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((d,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((d,), jnp.float32))
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if train:
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        n = x.size // d
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * var * n / max(n - 1, 1)
    else:
      mean, var = ra_mean.value, ra_var.value
    return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


class TransformerEncoderLayer(nn.Module):
  """Post-LN Transformer encoder layer (torch nn.TransformerEncoderLayer, ReLU, no dropout).

  x [B, L, d] → LN1(x + SelfAttn(x)) → LN2(· + Linear2(ReLU(Linear1(·)))).
  """
  heads: int = 1
  ffn: int = 2048
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"model.neck={d} is not divisible by model.heads={self.heads}.")
    qkv = dense_layer(3 * d, d, self.dtype, "in_proj", zero_bias=True)(x)
    q, k, v = (t.reshape(x.shape[:-1] + (self.heads, d // self.heads))
               for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits / math.sqrt(d // self.heads), axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhc->bqhc", attn, v).reshape(x.shape)
    y = dense_layer(d, d, self.dtype, "out_proj", zero_bias=True)(y)
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)
    x = ln("norm1")(x.astype(jnp.float32) + y.astype(jnp.float32))
    y = dense_layer(self.ffn, d, self.dtype, "linear1")(x.astype(self.dtype))
    y = dense_layer(d, self.ffn, self.dtype, "linear2")(nn.relu(y))
    return ln("norm2")(x + y.astype(jnp.float32))


class Attention(nn.Module):
  """Multi-head attention (torch nn.MultiheadAttention maths, separate `query` / `key_value`
  projections) of queries x against `memory` [G, T, d].

  x [P, S, d] (the same queries for every memory) or [P, G, S, d] (one set per pair) → [P, G,
  S, d]; with memory=None, self-attention of x [..., S, d] → [..., S, d]. The memory's key/value
  projection runs once per gallery map, and that of x [P, S, d] once per probe map."""
  heads: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, memory=None):
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"model.neck={d} is not divisible by model.heads={self.heads}.")
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, d // self.heads))
    q = split(dense_layer(d, d, self.dtype, "query", zero_bias=True)(x))
    k, v = jnp.split(dense_layer(2 * d, d, self.dtype, "key_value", zero_bias=True)(
        x if memory is None else memory), 2, axis=-1)
    k, v = split(k), split(v)
    if memory is None:
      spec = ("...shc,...thc->...hst", "...hst,...thc->...shc")
    elif x.ndim == 3:
      spec = ("pshc,gthc->pghst", "pghst,gthc->pgshc")
    else:
      spec = ("pgshc,gthc->pghst", "pghst,gthc->pgshc")
    logits = jnp.einsum(spec[0], q, k, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits / math.sqrt(d // self.heads), axis=-1).astype(v.dtype)
    y = jnp.einsum(spec[1], attn, v)
    y = y.reshape(y.shape[:-2] + (d,))
    return dense_layer(d, d, self.dtype, "out_proj", zero_bias=True)(y)


class TransformerDecoderLayer(nn.Module):
  """Post-LN decoder layer (torch nn.TransformerDecoderLayer, ReLU, no dropout):
  x → LN1(x + SelfAttn(x)) → LN2(· + CrossAttn(·, memory)) → LN3(· + Linear2(ReLU(Linear1(·)))).

  x [P, S, d] (first layer: the probe maps) or [P, G, S, d], memory [G, T, d] → [P, G, S, d].
  """
  heads: int = 1
  ffn: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, memory):
    d = x.shape[-1]
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)
    f32 = lambda t: t.astype(jnp.float32)
    x = ln("norm1")(f32(x) + f32(Attention(self.heads, self.dtype, name="self_attn")(x)))
    y = Attention(self.heads, self.dtype, name="cross_attn")(x.astype(self.dtype), memory)
    if x.ndim == 3:
      x = x[:, None]
    x = ln("norm2")(x + f32(y))
    y = dense_layer(self.ffn, d, self.dtype, "linear1")(x.astype(self.dtype))
    y = dense_layer(d, self.ffn, self.dtype, "linear2")(nn.relu(y))
    return ln("norm3")(x + f32(y))


def projected_similarities(probe, gallery, prior=None, gallery_chunk: int = 8):
  """Max-pooled, prior-weighted similarities of every probe × gallery pair and layer.

  probe [P, N, S, d], gallery [G, N, S, d] (already through fc1), prior [N, S, S] weights
  (probe location × gallery location) or None → [P, G, N, 2, S]: index 0 of axis 3 maximises
  over gallery locations (one value per probe location), index 1 over probe locations. Gallery
  maps are taken `gallery_chunk` at a time, so only [P, chunk, N, S, S] similarities exist at once.
  """
  def one_gallery(gi):  # [N, S, d]
    s = jnp.einsum("pntd,nrd->pntr", probe, gi, preferred_element_type=jnp.float32)
    if prior is not None:
      s = s * prior
    return jnp.stack([s.max(axis=3), s.max(axis=2)], axis=2)   # [P, N, 2, S]

  pooled = jax.lax.map(one_gallery, gallery, batch_size=min(gallery_chunk, gallery.shape[0]))
  return pooled.transpose(1, 0, 2, 3, 4)


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
