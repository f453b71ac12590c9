"""PyTorch's initialisation of nn.TransformerEncoderLayer, transcribed as a rule per parameter,
and a statistical check that an array follows a rule (shared by the encoder-init tests)."""
import math

import numpy as np


def torch_init_rule(d, ffn):
  """Transcription of torch's init of nn.TransformerEncoderLayer(d, nhead, ffn):
  MultiheadAttention._reset_parameters (xavier_uniform_ on the packed [3d, d] in_proj_weight,
  in_proj_bias and out_proj.bias set to 0) after each nn.Linear's reset_parameters
  (kaiming_uniform_(a=√5) → U(±1/√fan_in) weights, U(±1/√fan_in) biases); LayerNorm ones/zeros.
  → {our parameter path: ("uniform", bound) | ("const", value)}, shapes in our [in, out] layout."""
  lin = lambda fan_in: ("uniform", 1 / math.sqrt(fan_in))
  return {
      ("in_proj", "kernel"): ("uniform", math.sqrt(6 / (d + 3 * d))),
      ("in_proj", "bias"): ("const", 0.0),
      ("out_proj", "kernel"): lin(d), ("out_proj", "bias"): ("const", 0.0),
      ("linear1", "kernel"): lin(d), ("linear1", "bias"): lin(d),
      ("linear2", "kernel"): lin(ffn), ("linear2", "bias"): lin(ffn),
      ("norm1", "scale"): ("const", 1.0), ("norm1", "bias"): ("const", 0.0),
      ("norm2", "scale"): ("const", 1.0), ("norm2", "bias"): ("const", 0.0)}


TORCH_NAMES = {("in_proj", "kernel"): "self_attn.in_proj_weight",
               ("in_proj", "bias"): "self_attn.in_proj_bias",
               ("out_proj", "kernel"): "self_attn.out_proj.weight",
               ("out_proj", "bias"): "self_attn.out_proj.bias",
               ("linear1", "kernel"): "linear1.weight", ("linear1", "bias"): "linear1.bias",
               ("linear2", "kernel"): "linear2.weight", ("linear2", "bias"): "linear2.bias",
               ("norm1", "scale"): "norm1.weight", ("norm1", "bias"): "norm1.bias",
               ("norm2", "scale"): "norm2.weight", ("norm2", "bias"): "norm2.bias"}


def check_rule(value, rule):
  kind, x = rule
  value = np.asarray(value, np.float64)
  if kind == "const":
    np.testing.assert_array_equal(value, x)
    return
  n, sd = value.size, x / math.sqrt(3)                    # std of U(±x) = x/√3
  assert np.abs(value).max() <= x * (1 + 1e-6)
  assert np.abs(value).max() >= (1 - 8 / n) * x           # fills the interval
  assert abs(value.std() - sd) < max(0.03, 3 / math.sqrt(n)) * sd
  assert abs(value.mean()) < 5 * sd / math.sqrt(n)
