"""NFormer (Wang et al., CVPR 2022; docs/methods/nformer.md): a Transformer over a whole set of
re-id features.

Landmark Agent Attention (LAA) approximates the affinity of rows i, j by
  A_ij = (Q_i·K_Lᵀ)(Q_L·K_jᵀ) / √d_head
with L a few landmark rows drawn with an explicit PRNG key, and Reciprocal Neighbour Softmax (RNS)
restricts row i's softmax to its reciprocal top-k neighbours of the input cosine similarity
(computed once, shared by all blocks). Both are computed by gathering row i's k neighbours, so no
N×N array ever exists: memory is O(N·k·d) plus one row block's transients, which runs MSMT17's
query+gallery (N ≈ 93.8k) on a CPU in a few GB.

The module `NFormer` is the official one: the blocks, then BNNeck `bottleneck` (BatchNorm1d, frozen
zero bias) and the bias-free `classifier`; its eval output is the post-BN vector.

Parameter names follow the official checkpoint (`h.{i}.attn.c_attn.w` ↔
params['h_{i}']['attn']['c_attn']['kernel'], same (in, out) layout; LayerNorm g/b ↔ scale/bias).
"""
import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreid.nn.norms import l2_normalize

__all__ = ["NFormer", "reciprocal_neighbours", "sample_landmarks", "block_landmarks",
           "nformer_apply"]


def _pad_rows(x, multiple, value=0):
  pad = (-x.shape[0]) % multiple
  if pad == 0:
    return x
  return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], value, x.dtype)])


@partial(jax.jit, static_argnames=("k", "block"))
def _topk_blocked(x, k, block):
  n = x.shape[0]
  x = l2_normalize(x)
  rows = _pad_rows(x, block)
  starts = jnp.arange(rows.shape[0] // block) * block

  def one(args):
    xb, start = args
    sims = xb @ x.T                                                   # [block, N] transient
    self_col = (start + jnp.arange(block))[:, None] == jnp.arange(n)[None, :]
    sims = jnp.where(self_col, jnp.inf, sims)                         # self always first
    return jax.lax.top_k(sims, k)[1].astype(jnp.int32)

  idx = jax.lax.map(one, (rows.reshape(-1, block, x.shape[1]), starts))
  return idx.reshape(-1, k)[:n]


@partial(jax.jit, static_argnames=("block",))
def _reciprocal_mask(idx, block):
  n, k = idx.shape
  rows = _pad_rows(idx, block)
  starts = jnp.arange(rows.shape[0] // block) * block

  def one(args):
    ib, start = args
    me = start + jnp.arange(block)
    return jnp.any(idx[ib] == me[:, None, None], axis=-1)             # [block, k, k] compare

  mask = jax.lax.map(one, (rows.reshape(-1, block, k), starts))
  return mask.reshape(-1, k)[:n]


def reciprocal_neighbours(features, k=20, block=1024):
  """(idx [N, k] int32, mask [N, k] bool): idx[i] = the k rows of highest cosine similarity to
  row i (i itself first, then by decreasing similarity, ties to the lower index); mask[i, j] =
  i ∈ idx[idx[i, j]] (reciprocal neighbours; mask[i, 0] is always true). Computed in row blocks:
  no N×N array, transient memory O(block·N)."""
  features = jnp.asarray(features, jnp.float32)
  n = features.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} neighbours need 1 <= k <= N={n}")
  block = max(1, min(block, n))
  idx = _topk_blocked(features, k, block)
  return idx, _reciprocal_mask(idx, block)


def sample_landmarks(key, n, num_landmarks=5):
  """num_landmarks distinct row indices in [0, n), drawn with `key` (same key → same rows)."""
  if not 1 <= num_landmarks <= n:
    raise ValueError(f"num_landmarks={num_landmarks} needs 1 <= num_landmarks <= N={n}")
  return jax.random.choice(key, n, (num_landmarks,), replace=False).astype(jnp.int32)


def block_landmarks(key, n, num_landmarks=5, layers=4):
  """[layers, num_landmarks] landmark rows, block i's drawn with fold_in(key, i): the official
  attention draws new landmarks at every call, i.e. per block (docs/methods/nformer.md)."""
  return jnp.stack([sample_landmarks(jax.random.fold_in(key, i), n, num_landmarks)
                    for i in range(layers)])


def _dropout(key, x, rate):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _layer_norm(x, p, eps):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _linear(x, p):
  return x @ p["kernel"] + p["bias"]


def _block_forward(p, x, idx, mask, landmarks, heads, block, eps, dropout=0.0, key=None):
  """One post-LN block on padded rows x [Np, d]; rows are processed `block` at a time. With
  `dropout` > 0 (training), dropout on the attention projection output and on the MLP output
  (the official RESID_PDROP), drawn from `key`."""
  npad, d = x.shape
  dh = d // heads
  qkv = jax.lax.map(lambda xb: _linear(xb, p["attn"]["c_attn"]),
                    x.reshape(-1, block, d)).reshape(npad, 3, heads, dh)
  q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                          # [Np, H, dh]
  q_l, k_l = q[landmarks], k[landmarks]                               # [l, H, dh]
  a = jnp.einsum("nhd,lhd->nhl", q, k_l)                              # Q·K_Lᵀ, [Np, H, l]
  b = jnp.einsum("nhd,lhd->nhl", k, q_l)                              # (Q_L·Kᵀ)ᵀ, [Np, H, l]
  scale = 1.0 / math.sqrt(dh)

  drop = (lambda k, y: _dropout(k, y, dropout)) if dropout > 0 else (lambda k, y: y)

  def one(args):
    xb, ab, ib, mb, kb = args
    logits = jnp.einsum("bhl,bkhl->bhk", ab, b[ib]) * scale           # A_ij over neighbours
    logits = jnp.where(mb[:, None, :], logits, -jnp.inf)
    w = jax.nn.softmax(logits, axis=-1)                               # RNS
    out = jnp.einsum("bhk,bkhd->bhd", w, v[ib]).reshape(-1, d)
    n1 = _layer_norm(xb + drop(kb[0], _linear(out, p["attn"]["c_proj"])), p["ln_1"], eps)
    hid = jax.nn.gelu(_linear(n1, p["mlp"]["c_fc"]), approximate=True)
    return _layer_norm(n1 + drop(kb[1], _linear(hid, p["mlp"]["c_proj"])), p["ln_2"], eps)

  nb = npad // block
  keys = (jax.random.split(key, (nb, 2)) if dropout > 0
          else jnp.zeros((nb, 2), jnp.uint32))                        # unused without dropout
  out = jax.lax.map(one, (x.reshape(nb, block, d), a.reshape(nb, block, heads, -1),
                          idx.reshape(nb, block, -1), mask.reshape(nb, block, -1), keys))
  return out.reshape(npad, d)


@partial(jax.jit, static_argnames=("heads", "block", "eps", "dropout"))
def _forward(params, x, idx, mask, landmarks, num_queries, heads, block, eps, dropout=0.0,
             dropout_key=None):
  n = x.shape[0]
  rows = jnp.arange(n)
  # Queries (rows < num_queries) do not attend to other queries; self always stays.
  other_query = (rows[:, None] < num_queries) & (idx < num_queries) & (idx != rows[:, None])
  mask = mask & ~other_query
  x, idx = _pad_rows(x, block), _pad_rows(idx, block)
  mask = _pad_rows(mask, block, True)          # padded rows attend to row 0: finite, discarded
  for i in range(len(params)):
    x = _block_forward(params[f"h_{i}"], x, idx, mask,
                       landmarks[i] if landmarks.ndim == 2 else landmarks, heads, block, eps,
                       dropout, None if dropout_key is None else jax.random.fold_in(dropout_key, i))
  return x[:n]


def nformer_apply(params, features, landmarks, *, num_queries=0, k=20, heads=2, block=2048,
                  neighbours=None, eps=1e-5, dropout=0.0, dropout_key=None):
  """The NFormer blocks as a pure function of `params` ({"h_0": …, "h_{L-1}": …} of `NFormer`).
  features [N, d]; landmarks [l] row indices shared by all blocks, or [L, l] one row per block
  (see `block_landmarks`); the first `num_queries` rows are queries that attend to no other
  query; k is clipped to N; neighbours = (idx, mask) from `reciprocal_neighbours(features, k)`
  unless given; `dropout` > 0 with `dropout_key`: training dropout (see `_block_forward`).
  Returns [N, d]."""
  if dropout > 0 and dropout_key is None:
    raise ValueError("dropout > 0 needs a dropout_key.")
  features = jnp.asarray(features, jnp.float32)
  n = features.shape[0]
  block = max(1, min(block, n))
  if neighbours is None:                       # a set smaller than k: every row is a neighbour
    neighbours = reciprocal_neighbours(features, min(k, n), min(block, 1024))
  idx, mask = neighbours
  return _forward(params, features, jnp.asarray(idx, jnp.int32), jnp.asarray(mask, bool),
                  jnp.asarray(landmarks, jnp.int32), jnp.int32(num_queries), heads, block, eps,
                  float(dropout if dropout_key is not None else 0.0), dropout_key)


_normal = nn.initializers.normal(0.02)


class _Linear(nn.Module):
  """A Conv1D/Linear's parameters (kernel [in, out] like the official `w`; bias `b`)."""
  features_in: int
  features_out: int

  @nn.compact
  def __call__(self):
    return {"kernel": self.param("kernel", _normal, (self.features_in, self.features_out)),
            "bias": self.param("bias", nn.initializers.zeros, (self.features_out,))}


class _LayerNormParams(nn.Module):
  dim: int

  @nn.compact
  def __call__(self):
    return {"scale": self.param("scale", nn.initializers.ones, (self.dim,)),
            "bias": self.param("bias", nn.initializers.zeros, (self.dim,))}


class _Group(nn.Module):
  """Named parameter groups: `attn` = c_attn, c_proj; `mlp` = c_fc, c_proj."""
  shapes: tuple

  @nn.compact
  def __call__(self):
    return {name: _Linear(i, o, name=name)() for name, i, o in self.shapes}


class _Block(nn.Module):
  dim: int
  ffn: int

  @nn.compact
  def __call__(self):
    d = self.dim
    return {"attn": _Group((("c_attn", d, 3 * d), ("c_proj", d, d)), name="attn")(),
            "ln_1": _LayerNormParams(d, name="ln_1")(),
            "mlp": _Group((("c_fc", d, self.ffn), ("c_proj", self.ffn, d)), name="mlp")(),
            "ln_2": _LayerNormParams(d, name="ln_2")()}


class NFormer(nn.Module):
  """The official NFormer module: `layers` blocks (parameters h_{i}, see `nformer_apply`),
  then BNNeck `bottleneck` (BatchNorm1d without a bias: the official bias is frozen at zero) and
  a bias-free `classifier` over the training ids when `num_classes` > 0.

  __call__(features, landmark_key, num_queries=0, neighbours=None, train=False) ->
  (pre-BN, post-BN, logits or None), each with the leading shape of `features`: one set [N, dim],
  or several [P, S, dim] (training: each set is its own attention context with its own landmarks
  from `landmark_key`, BN statistics over all P·S rows, as the official batch of sets). Each
  block draws its own landmarks (`block_landmarks`: fold_in(set key, block)), so a fixed key
  gives a deterministic evaluation. BN uses the batch statistics when `train` (batch_stats
  mutable), running statistics otherwise; the logits are computed in training only (evaluation
  ranks the post-BN vectors). `dropout` (official RESID_PDROP 0.1) acts when `train`, from the
  'dropout' rng."""
  dim: int = 256
  heads: int = 2
  ffn: int = 1024
  layers: int = 4
  k: int = 20
  num_landmarks: int = 5
  num_classes: int = 0
  block: int = 2048
  eps: float = 1e-5
  dropout: float = 0.0

  @nn.compact
  def __call__(self, features, landmark_key, num_queries=0, neighbours=None, train=False):
    if self.dim % self.heads:
      raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
    params = {f"h_{i}": _Block(self.dim, self.ffn, name=f"h_{i}")() for i in range(self.layers)}
    sets = features if features.ndim == 3 else features[None]
    if sets.ndim != 3 or (neighbours is not None and features.ndim == 3):
      raise ValueError(f"features must be [N, dim] (neighbours allowed) or [P, S, dim]; got "
                       f"shape {features.shape}")
    n = sets.shape[1]
    keys = jax.random.split(landmark_key, sets.shape[0]) if features.ndim == 3 else [landmark_key]
    rate = self.dropout if train and not self.is_initializing() else 0.0
    drop_keys = (jax.random.split(self.make_rng("dropout"), sets.shape[0]) if rate > 0
                 else [None] * sets.shape[0])
    pre = jnp.stack([
        nformer_apply(params, x, block_landmarks(key, n, min(self.num_landmarks, n), self.layers),
                      num_queries=num_queries, k=self.k, heads=self.heads, block=self.block,
                      neighbours=neighbours, eps=self.eps, dropout=rate, dropout_key=drop_key)
        for x, key, drop_key in zip(sets, keys, drop_keys)]).reshape(features.shape)
    flat = pre.reshape(-1, self.dim)
    post = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        use_bias=False, name="bottleneck")(flat)
    logits = None
    if self.num_classes and (train or self.is_initializing()):
      logits = nn.Dense(self.num_classes, use_bias=False, name="classifier",
                        kernel_init=nn.initializers.normal(0.001))(post)
      logits = logits.reshape(features.shape[:-1] + (self.num_classes,))
    return pre, post.reshape(features.shape), logits
