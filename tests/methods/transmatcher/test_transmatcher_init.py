"""TransMatcher's encoder layers start as the official code's: PyTorch's nn.TransformerEncoderLayer
init, every layer a copy of one (nn.TransformerEncoder deep-copies its layer)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import transmatcher as tm_config
from jaxreid.registry import build_model
from jaxreid.models import init_variables

D_MODEL, FFN = 64, 256


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


def encoder_params(encoder_init, seed=0):
  c = tm_config.get_config()
  c.model.update(neck=D_MODEL, ffn=FFN, num_layers=3, encoder_init=encoder_init)
  model = build_model(c)
  return init_variables(model, jax.random.key(seed), c.data.height, c.data.width)["params"][
      "encoder"]


def test_torch_layer_follows_the_transcribed_rule():
  """The rule above is what torch does (torch's own layer, deep-copied by nn.TransformerEncoder)."""
  torch.manual_seed(0)
  layer = torch.nn.TransformerEncoderLayer(D_MODEL, 1, FFN, 0.0)
  stack = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
  state = {k: v.detach().numpy() for k, v in stack.state_dict().items()}
  for path, rule in torch_init_rule(D_MODEL, FFN).items():
    name = TORCH_NAMES[path]
    check_rule(state[f"layers.0.{name}"], rule)
    np.testing.assert_array_equal(state[f"layers.0.{name}"], state[f"layers.1.{name}"])


def test_torch_init_statistics_and_identical_layers():
  params = encoder_params("torch")
  rule = torch_init_rule(D_MODEL, FFN)
  torch_layer = torch.nn.TransformerEncoderLayer(D_MODEL, 1, FFN, 0.0).state_dict()
  for (module, leaf), r in rule.items():
    ours = np.asarray(params["layers_0"][module][leaf])
    assert ours.shape == tuple(torch_layer[TORCH_NAMES[(module, leaf)]].shape[::-1])
    check_rule(ours, r)
    np.testing.assert_array_equal(ours, params["layers_1"][module][leaf])   # deep copies
  # Another seed draws another (shared) layer.
  other = encoder_params("torch", seed=1)
  assert not np.array_equal(other["layers_0"]["linear1"]["kernel"],
                            params["layers_0"]["linear1"]["kernel"])


def test_xavier_default_keeps_its_init():
  params = encoder_params("xavier")
  d, ffn = D_MODEL, FFN
  check_rule(params["layers_0"]["out_proj"]["kernel"], ("uniform", math.sqrt(6 / (2 * d))))
  check_rule(params["layers_0"]["linear1"]["kernel"], ("uniform", math.sqrt(6 / (d + ffn))))
  assert not np.array_equal(params["layers_0"]["linear1"]["kernel"],
                            params["layers_1"]["linear1"]["kernel"])
  assert tm_config.get_config().model.encoder_init == "xavier"


@pytest.mark.parametrize("setting", sorted(tm_config.PAPER) + ["table2", "table2_small"])
def test_paper_settings_use_the_torch_init(setting):
  assert tm_config.get_config(setting).model.encoder_init == "torch"


def test_unknown_init_is_one_sentence():
  with pytest.raises(ValueError, match="model.encoder_init='kaiming' is unknown"):
    encoder_params("kaiming")
