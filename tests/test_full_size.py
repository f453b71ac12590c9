"""Full-size QAConv (ResNet-50-IBN-b, 384×128) by shapes only: no compile, no real weights."""
import jax
import numpy as np

from configs import qaconv_gs
from jaxreid.methods.qaconv.convert import qaconv_from_official
from jaxreid.models import init_variables
from jaxreid.registry import build_model
from official_keys import DATA, official_shapes

KEYS = DATA / "official_qaconv_resnet50_ibn_b_keys.txt"


def test_paper_config_matches_the_official_parameter_layout():
  config = qaconv_gs.get_config("msmt17_all")
  model = build_model(config)
  abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 384, 128))
  maps = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), abstract,
                        jax.ShapeDtypeStruct((2, 384, 128, 3), np.uint8))
  assert maps.shape == (2, 24, 8, 128)

  shapes = official_shapes(KEYS)
  rng = np.random.default_rng(0)
  fake = lambda shape: rng.standard_normal(shape).astype(np.float32) if shape else np.int64(0)
  ckpt = {"model": {f"base.{k}": fake(s) for k, s in shapes["resnet50_ibn_b"].items()
                    if not k.startswith("fc.")},
          "criterion": {f"matcher.{k}": fake(s) for k, s in shapes["QAConv"].items()},
          "epoch": 0}
  ckpt["model"]["neck_conv.weight"] = fake((128, 1024, 3, 3))
  ckpt["model"]["neck_conv.bias"] = fake((128,))
  overrides, variables = qaconv_from_official(ckpt)
  assert overrides["model"]["depth"] == 50 and overrides["model"]["ibn"] == "b"
  assert overrides["model"]["head"] == "v2.1"
  # Every layer of our full-size model receives an official tensor of the right shape, and
  # nothing is left over (layer4 and the ImageNet fc are beyond final_layer=layer3).
  ours = jax.tree.map(lambda x: x.shape, abstract)
  theirs = jax.tree.map(lambda x: np.shape(x), variables)
  assert ours == theirs
