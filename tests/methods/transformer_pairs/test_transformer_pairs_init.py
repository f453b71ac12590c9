"""Transformer-Cat / -Cross encoder layers under `model.encoder_init = "torch"` (their Table 2
setting): PyTorch's nn.TransformerEncoderLayer init, every layer a copy of one."""
import jax
import numpy as np
import pytest

from configs import transformer_cat, transformer_cross
from jaxreid.models import init_variables
from jaxreid.registry import build_model
from torch_init import check_rule, torch_init_rule

D_MODEL, FFN = 32, 128


def encoder_layers(config_module, encoder_init):
  c = config_module.get_config()
  c.model.update(neck=D_MODEL, ffn=FFN, num_layers=2, encoder_init=encoder_init)
  params = init_variables(build_model(c), jax.random.key(0), c.data.height,
                          c.data.width)["params"]
  side = params["matcher"] if config_module is transformer_cat else params["encoder"]
  return [side[f"layers_{i}"] for i in range(2)]


@pytest.mark.parametrize("config_module", [transformer_cat, transformer_cross])
def test_torch_init_gives_identical_layers_following_torch(config_module):
  first, second = encoder_layers(config_module, "torch")
  for (module, name), rule in torch_init_rule(D_MODEL, FFN).items():
    check_rule(first[module][name], rule)
    np.testing.assert_array_equal(first[module][name], second[module][name])
  xavier = encoder_layers(config_module, "xavier")       # the default: drawn per layer
  assert not np.array_equal(xavier[0]["linear1"]["kernel"], xavier[1]["linear1"]["kernel"])


def test_table2_settings_use_the_torch_init():
  for module in (transformer_cat, transformer_cross):
    assert module.get_config("table2").model.encoder_init == "torch"
    assert module.get_config().model.encoder_init == "xavier"
