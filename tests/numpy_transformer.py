"""Float64 NumPy forwards of the shared Transformer layers (torch nn.TransformerEncoderLayer /
DecoderLayer maths, post-LN, ReLU) and random variables: the reference of every Transformer test."""
import jax
import numpy as np
from flax import traverse_util

H, W, D_MODEL, FFN, N, HEADS = 4, 2, 16, 24, 2, 2
S = H * W
EPS = 1e-5


def randomized(variables, seed=0, scale=0.3):
  """Every parameter random (not just the init), BN running stats random and valid."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, x in traverse_util.flatten_dict(variables).items():
    if path[0] == "batch_stats" and path[-1] == "var":
      out[path] = rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    else:
      out[path] = (rng.standard_normal(x.shape) * scale).astype(np.float32)
  return traverse_util.unflatten_dict(out)


def rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def layer_norm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def linear(x, p):
  return x @ p["kernel"] + p["bias"]


def attend(q, k, v):
  """Multi-head scaled dot-product attention, q [T, d], k/v [M, d] → [T, d]."""
  c = q.shape[-1] // HEADS
  out = []
  for h in range(HEADS):
    qh, kh, vh = (t[:, h * c:(h + 1) * c] for t in (q, k, v))
    logits = qh @ kh.T / np.sqrt(c)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    out.append((a / a.sum(-1, keepdims=True)) @ vh)
  return np.concatenate(out, -1)


def ffn(x, p):
  return linear(np.maximum(linear(x, p["linear1"]), 0), p["linear2"])


def encoder_layer(x, p):
  """torch nn.TransformerEncoderLayer, post-LN, packed in_proj [d, 3d] (q, k, v)."""
  q, k, v = np.split(linear(x, p["in_proj"]), 3, axis=-1)
  x = layer_norm(x + linear(attend(q, k, v), p["out_proj"]), p["norm1"])
  return layer_norm(x + ffn(x, p), p["norm2"])


def mha(x, memory, p):
  k, v = np.split(linear(memory, p["key_value"]), 2, axis=-1)
  return linear(attend(linear(x, p["query"]), k, v), p["out_proj"])


def decoder_layer(x, memory, p):
  x = layer_norm(x + mha(x, x, p["self_attn"]), p["norm1"])
  x = layer_norm(x + mha(x, memory, p["cross_attn"]), p["norm2"])
  return layer_norm(x + ffn(x, p), p["norm3"])
