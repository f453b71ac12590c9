"""TransMatcher's encoder layers start as the official code's: PyTorch's nn.TransformerEncoderLayer
init, every layer a copy of one (nn.TransformerEncoder deep-copies its layer)."""
import math

import jax
import numpy as np
import pytest
import torch

from configs import transmatcher as tm_config
from jaxreid.registry import build_model
from jaxreid.models import init_variables
from torch_init import TORCH_NAMES, check_rule, torch_init_rule

D_MODEL, FFN = 64, 256


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
