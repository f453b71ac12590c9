"""Transformer layers and initialisers shared by the Transformer-based methods (TransMatcher's
encoder, the Table 2 baselines, and the ViT-style poolings): post-LN encoder / decoder layers in
torch `nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer` maths (ReLU, no dropout), with
xavier-uniform kernels and PyTorch's Linear bias init."""
import math
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxreid.weights import linear, torch_linear

xavier = nn.initializers.xavier_uniform()


def torch_bias_init(fan_in: int):
  """PyTorch's default Linear bias init: U(-1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# PyTorch's default Linear weight init, kaiming_uniform(a=√5): U(±1/√fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def keyed_init(init, key, tag: str):
  """`init` drawing from `key` folded with `tag` instead of the key Flax gives the parameter, so
  modules given the same key start with identical parameters."""
  data = zlib.crc32(tag.encode()) & 0x7FFFFFFF
  return lambda _, shape, dtype=jnp.float32: init(jax.random.fold_in(key, data), shape, dtype)


def dense_layer(features, fan_in, dtype, name, zero_bias=False):
  """nn.Dense with xavier-uniform kernel and PyTorch's Linear bias init (or a zero bias, as the
  attention projections of torch nn.MultiheadAttention)."""
  bias = nn.initializers.zeros if zero_bias else torch_bias_init(fan_in)
  return nn.Dense(features, kernel_init=xavier, bias_init=bias, dtype=dtype, name=name)


class TransformerEncoderLayer(nn.Module):
  """Post-LN Transformer encoder layer (torch nn.TransformerEncoderLayer, ReLU, no dropout).

  x [B, L, d] → LN1(x + SelfAttn(x)) → LN2(· + Linear2(ReLU(Linear1(·)))).

  init_style "xavier": every kernel xavier-uniform; "torch": as PyTorch initialises
  nn.TransformerEncoderLayer (MultiheadAttention._reset_parameters: xavier-uniform packed in_proj;
  Linear.reset_parameters: U(±1/√fan_in) kernels for out_proj, linear1, linear2). Biases in both:
  zero for in_proj / out_proj, U(±1/√fan_in) for linear1 / linear2. `init_key`: draw every
  parameter from this key instead (layers given the same key start identical, as the deep copies
  of torch nn.TransformerEncoder).
  """
  heads: int = 1
  ffn: int = 2048
  dtype: Any = jnp.float32
  init_style: str = "xavier"
  init_key: Any = None

  def _dense(self, features, fan_in, name, zero_bias=False, torch_kernel=True):
    if self.init_style not in ("xavier", "torch"):
      raise ValueError(f"model.encoder_init={self.init_style!r} is unknown; use 'xavier' or "
                       "'torch'.")
    if self.init_style == "xavier" and self.init_key is None:
      return dense_layer(features, fan_in, self.dtype, name, zero_bias)
    kernel = torch_kernel_init if self.init_style == "torch" and torch_kernel else xavier
    bias = nn.initializers.zeros if zero_bias else torch_bias_init(fan_in)
    if self.init_key is not None:
      kernel = keyed_init(kernel, self.init_key, f"{name}/kernel")
      bias = keyed_init(bias, self.init_key, f"{name}/bias")
    return nn.Dense(features, kernel_init=kernel, bias_init=bias, dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"model.neck={d} is not divisible by model.heads={self.heads}.")
    qkv = self._dense(3 * d, d, "in_proj", zero_bias=True, torch_kernel=False)(x)
    q, k, v = (t.reshape(x.shape[:-1] + (self.heads, d // self.heads))
               for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits / math.sqrt(d // self.heads), axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhc->bqhc", attn, v).reshape(x.shape)
    y = self._dense(d, d, "out_proj", zero_bias=True)(y)
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)
    x = ln("norm1")(x.astype(jnp.float32) + y.astype(jnp.float32))
    y = self._dense(self.ffn, d, "linear1")(x.astype(self.dtype))
    y = self._dense(d, self.ffn, "linear2")(nn.relu(y))
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


def encoder_layer_from_torch(state: Mapping, prefix: str) -> dict:
  """Flax TransformerEncoderLayer params of a torch nn.TransformerEncoderLayer."""
  attn = {"kernel": np.asarray(state[f"{prefix}self_attn.in_proj_weight"], np.float32).T,
          "bias": np.asarray(state[f"{prefix}self_attn.in_proj_bias"], np.float32)}
  norm = lambda name: {"scale": np.asarray(state[f"{prefix}{name}.weight"], np.float32),
                       "bias": np.asarray(state[f"{prefix}{name}.bias"], np.float32)}
  return {"in_proj": attn, "out_proj": linear(state, f"{prefix}self_attn.out_proj"),
          "linear1": linear(state, f"{prefix}linear1"),
          "linear2": linear(state, f"{prefix}linear2"),
          "norm1": norm("norm1"), "norm2": norm("norm2")}


def encoder_layer_to_torch(params: Mapping, prefix: str) -> dict:
  """The torch nn.TransformerEncoderLayer state of a `TransformerEncoderLayer`'s params."""
  out = {f"{prefix}self_attn.in_proj_weight": np.asarray(params["in_proj"]["kernel"], np.float32).T,
         f"{prefix}self_attn.in_proj_bias": np.asarray(params["in_proj"]["bias"], np.float32)}
  out.update(torch_linear(params["out_proj"], f"{prefix}self_attn.out_proj"))
  for name in ("linear1", "linear2"):
    out.update(torch_linear(params[name], prefix + name))
  for name in ("norm1", "norm2"):
    out[f"{prefix}{name}.weight"] = np.asarray(params[name]["scale"], np.float32)
    out[f"{prefix}{name}.bias"] = np.asarray(params[name]["bias"], np.float32)
  return out
