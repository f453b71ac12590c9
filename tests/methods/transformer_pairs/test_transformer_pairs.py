"""Transformer-Cat / Transformer-Cross (TransMatcher paper Table 2) against NumPy forwards of
one pair, what swapping probe and gallery does, one train step each, and the full-size shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import transformer_cat, transformer_cross
from jaxreid.methods.transformer_pairs.model import (ProbeMemoryEncoder, TransformerCat,
                                                TransformerCross)
from jaxreid.backbones.resnet import ResNet
from jaxreid.models import FeatureMapEncoder
from jaxreid.registry import build_model
from numpy_transformer import (D_MODEL, EPS, FFN, H, HEADS, N, S, W, decoder_layer, encoder_layer,
                               f64, linear, rand, randomized)

RESNET18 = ResNet(depth=18, ibn="b", width=8)   # the encoder backbone of these tests


def make(module, maps_shape, seed=0):
  v = module.init(jax.random.key(0), np.zeros((2,) + maps_shape, np.float32),
                  np.zeros((2,) + maps_shape, np.float32))
  return randomized(v, seed)


def cat_matcher(**kw):
  module = TransformerCat(H, W, num_layers=N, heads=HEADS, ffn=FFN, **kw)
  return module, make(module, (H, W, D_MODEL))


def cross_matcher(readout="mean"):
  module = TransformerCross(H, W, num_layers=N, heads=HEADS, ffn=FFN, readout=readout)
  return module, make(module, (2, H, W, D_MODEL))


# --- NumPy forwards (float64) of one pair ---------------------------------------------------

def readout(vec, params, stats):
  s = float(linear(vec, params["head"])[0])
  return ((s - stats["norm"]["mean"][0]) / np.sqrt(stats["norm"]["var"][0] + EPS)
          * params["norm"]["scale"][0] + params["norm"]["bias"][0])


def cat_reference(v, probe, gallery, pos_embed=True):
  """One pair: [cls, probe + pos + seg_0, gallery + pos + seg_1] → N encoder layers → cls."""
  params, stats = f64(v["params"]), f64(v["batch_stats"])
  p, g = (np.asarray(t, np.float64).reshape(S, D_MODEL) for t in (probe, gallery))
  if pos_embed:
    p, g = p + params["pos_embed"], g + params["pos_embed"]
  x = np.concatenate([params["cls"], p + params["segment"][0], g + params["segment"][1]])
  for n in range(N):
    x = encoder_layer(x, params[f"layers_{n}"])
  return readout(x[0], params, stats)


def cross_reference(v, probe, gallery, pool="mean"):
  """One pair: probe neck map (index 0) through N decoder layers over the gallery memory
  (index 1) → mean / max over probe tokens, or the output of a prepended class token."""
  params, stats = f64(v["params"]), f64(v["batch_stats"])
  x = np.asarray(probe[0], np.float64).reshape(S, D_MODEL)
  memory = np.asarray(gallery[1], np.float64).reshape(S, D_MODEL)
  if pool == "cls":
    x = np.concatenate([params["cls"], x])
  for n in range(N):
    x = decoder_layer(x, memory, params[f"layers_{n}"])
  vec = {"mean": lambda: x.mean(0), "max": lambda: x.max(0), "cls": lambda: x[0]}[pool]()
  return readout(vec, params, stats)


# --- (1) scores equal the NumPy forward ---------------------------------------------------

@pytest.mark.parametrize("pos_embed", [True, False], ids=["pos", "no_pos"])
def test_cat_equals_numpy_reference(pos_embed):
  module, v = cat_matcher(pos_embed=pos_embed)
  probe, gallery = rand((3, H, W, D_MODEL), 1), rand((4, H, W, D_MODEL), 2)
  got = np.asarray(jax.jit(module.apply)(v, probe, gallery))
  assert got.shape == (3, 4)
  for i, j in [(0, 0), (1, 3), (2, 1), (2, 2)]:
    np.testing.assert_allclose(got[i, j], cat_reference(v, probe[i], gallery[j], pos_embed),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", ["mean", "max", "cls"])
def test_cross_equals_numpy_reference(pool):
  module, v = cross_matcher(pool)
  probe, gallery = rand((3, 2, H, W, D_MODEL), 1), rand((4, 2, H, W, D_MODEL), 2)
  got = np.asarray(jax.jit(module.apply)(v, probe, gallery))
  assert got.shape == (3, 4)
  for i, j in [(0, 0), (1, 3), (2, 1), (2, 2)]:
    np.testing.assert_allclose(got[i, j], cross_reference(v, probe[i], gallery[j], pool),
                               rtol=1e-4, atol=1e-4)


def test_cross_encoder_maps_are_neck_and_memory():
  """encode() → [neck output, enc_N(neck output)]: the probe's queries and the gallery's memory."""
  enc = ProbeMemoryEncoder(RESNET18, neck=D_MODEL, num_layers=N + 1, encoders=N,
                           heads=HEADS, ffn=FFN, normalize=False)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64, 32, 3)), jnp.uint8)
  v = enc.init(jax.random.key(0), images)
  out = np.asarray(enc.apply(v, images))
  assert out.shape == (2, 2, H, W, D_MODEL)
  neck = FeatureMapEncoder(RESNET18, neck=D_MODEL, normalize=False).apply(
      {"params": {k: v["params"][k] for k in ("backbone", "neck_conv")},
       "batch_stats": v["batch_stats"]}, images)
  np.testing.assert_allclose(out[:, 0], neck, atol=1e-6)
  params = f64(v["params"])
  for b in range(2):
    x = np.asarray(neck[b], np.float64).reshape(S, D_MODEL)
    for n in range(N):
      x = encoder_layer(x, params[f"layers_{n}"])
    np.testing.assert_allclose(out[b, 1].reshape(S, D_MODEL), x, rtol=1e-4, atol=1e-4)


def test_xavier_uniform_init():
  """Every ≥2-D matcher parameter is xavier-uniform over (fan_in, fan_out) = its two axes."""
  for module, shape in ((TransformerCat(H, W, num_layers=N, heads=HEADS, ffn=FFN),
                         (H, W, D_MODEL)),
                        (TransformerCross(H, W, num_layers=N, heads=HEADS, ffn=FFN),
                         (2, H, W, D_MODEL))):
    zeros = np.zeros((2,) + shape, np.float32)
    params = traverse_util.flatten_dict(module.init(jax.random.key(1), zeros, zeros)["params"])
    two_d = {k: np.abs(np.asarray(x)) for k, x in params.items() if x.ndim >= 2}
    assert len(two_d) >= 4 * N
    for name, x in two_d.items():
      bound = np.sqrt(6 / sum(x.shape))
      assert x.max() <= bound and x.max() > 0.5 * bound, name


# --- (2) swapping probe and gallery --------------------------------------------------------

def test_cat_transposes_exactly_when_segment_codes_are_equal():
  """Attention ignores token order and the position code is per grid location, shared by both
  images, so swapping the inputs only swaps the segment codes: with seg_0 = seg_1 the score
  matrix transposes; with distinct learned codes it does not."""
  module, v = cat_matcher()
  a, b = rand((3, H, W, D_MODEL), 3), rand((4, H, W, D_MODEL), 4)
  score = lambda v, p, g: np.asarray(jax.jit(module.apply)(v, p, g))
  base = score(v, a, b)
  assert np.abs(base - score(v, b, a).T).max() > 0.1 * np.ptp(base)
  same = jax.tree.map(lambda x: x, v)
  seg = np.asarray(v["params"]["segment"])
  same["params"]["segment"] = np.repeat(seg[:1], 2, axis=0)
  tied = score(same, a, b)
  assert np.abs(tied - score(same, b, a).T).max() <= 1e-4 * np.ptp(tied)


def test_cross_is_asymmetric_and_permutation_invariant():
  """Scores read the probe only through its neck map and the gallery only through its memory;
  the decoder treats the two roles differently, so even maps whose neck map equals their
  memory do not give a transposed matrix when swapped. Without positional codes the score is
  invariant to reordering the locations of either map (the mean readout and the keys)."""
  module, v = cross_matcher()
  a, b = rand((3, 2, H, W, D_MODEL), 5), rand((4, 2, H, W, D_MODEL), 6)
  score = lambda p, g: np.asarray(jax.jit(module.apply)(v, p, g))
  base = score(a, b)
  unused = a.copy(), b.copy()
  unused[0][:, 1], unused[1][:, 0] = rand((3, H, W, D_MODEL), 7), rand((4, H, W, D_MODEL), 8)
  close = lambda x: np.abs(x - base).max() <= 1e-4 * np.ptp(base)
  assert close(score(*unused))
  tied_a, tied_b = np.repeat(a[:, :1], 2, axis=1), np.repeat(b[:, :1], 2, axis=1)
  tied = score(tied_a, tied_b)
  assert np.abs(tied - score(tied_b, tied_a).T).max() > 0.1 * np.ptp(tied)
  perm = np.random.default_rng(0).permutation(S)
  shuffle = lambda m, p: m.reshape(m.shape[:2] + (S, D_MODEL))[:, :, p].reshape(m.shape)
  assert close(score(shuffle(a, perm), shuffle(b, perm[::-1])))


# --- (3) one train step through the shared pipeline ---------------------------------------

@pytest.mark.parametrize("config_module", [transformer_cat, transformer_cross],
                         ids=["cat", "cross"])
def test_one_train_step(config_module, synthetic_data_dir):
  from training import tiny

  from jaxreid.data import datasets, pipeline
  from jaxreid.data.samplers import PKSampler
  from jaxreid import registry
  from jaxreid.train.loop import create_train_state, make_train_step
  from jaxreid.train.optim import CLIP_GROUPS, LR_GROUPS, _group_labels, make_optimizer
  config = tiny(config_module.get_config(), synthetic_data_dir, width=8, batch_size=16)
  config.model.update(neck=D_MODEL, ffn=FFN, num_layers=N, heads=HEADS)
  split = datasets.load_train(config.dataset.train, data_dir=synthetic_data_dir)
  indices = PKSampler(split.labels, batch_size=16, num_instances=4, seed=0).epoch_plan(0)[0]
  (images, _), = pipeline.eval_batches(split, batch_size=16, height=64, width=32,
                                       indices=indices, num_threads=1)
  batch = {"image": jnp.asarray(images["image"]),
           "label": jnp.asarray(split.labels[indices], jnp.int32)}
  model = build_model(config)
  tx = make_optimizer(config.train, steps_per_epoch=10)
  objective = registry.method_of(config).objectives[config.train.loss]
  state = create_train_state(config, model, tx, objective, num_classes=split.num_classes,
                             num_images=len(split.labels), rng=jax.random.key(0))
  # Backbone vs new layers (lr), feature side vs scorer (clipping), whatever the groups' names.
  groups = lambda tree: set(jax.tree.leaves(tree))
  lr, clip = _group_labels(state.params, LR_GROUPS), _group_labels(state.params, CLIP_GROUPS)
  assert groups(lr["matcher"]) == groups(lr["encoder"]["neck_conv"]) != groups(
      lr["encoder"]["backbone"])
  assert len(groups(clip["matcher"])) == len(groups(clip["encoder"])) == 1
  assert groups(clip["matcher"]) != groups(clip["encoder"])
  new, metrics = jax.jit(make_train_step(model, tx, objective, config.train))(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       state.params, new.params)
  assert moved["matcher"]["head"]["kernel"] and moved["matcher"]["layers_0"]["linear1"]["kernel"]
  assert moved["encoder"]["neck_conv"]["kernel"] and moved["encoder"]["backbone"]["conv1"]["kernel"]
  if config_module is transformer_cross:
    assert moved["encoder"]["layers_1"]["linear2"]["kernel"]   # the memory's encoder layers
    assert moved["matcher"]["layers_1"]["cross_attn"]["key_value"]["kernel"]
  else:
    assert moved["matcher"]["cls"] and moved["matcher"]["segment"]


# --- (4) full size, shapes only -------------------------------------------------------------

@pytest.mark.parametrize("config_module", [transformer_cat, transformer_cross],
                         ids=["cat", "cross"])
def test_table2_setting_shapes(config_module):
  """The paper's Table 2 setting: ResNet-50-IBN-b at 384×128 → 24×8 maps, d 128, D 512, N 2,
  H 1 (jax.eval_shape: nothing is computed)."""
  c = config_module.get_config("table2")
  m = c.model
  assert (m.neck, m.ffn, m.num_layers, m.heads, m.depth, c.data.height, c.data.width) == (
      128, 512, 2, 1, 50, 384, 128)
  assert (c.data.sampler, c.train.loss, c.train.lr, c.train.backbone_lr_mult, c.train.epochs,
          c.train.clip_norm, c.train.bf16) == ("gs", "pairwise", 0.005, 0.1, 15, 4.0, True)
  assert set(c.eval.paper) == {"cuhk03_np/detected", "market1501"}
  model = build_model(c)
  images = jax.ShapeDtypeStruct((2, 384, 128, 3), jnp.uint8)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  maps = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), v, images)
  want = (2, 24, 8, 128) if m.name == "transformer_cat" else (2, 2, 24, 8, 128)
  assert maps.shape == want
  probe = jax.ShapeDtypeStruct((c.eval.tile_p,) + want[1:], maps.dtype)
  gallery = jax.ShapeDtypeStruct((c.eval.tile_g,) + want[1:], maps.dtype)
  scores = jax.eval_shape(lambda v, p, g: model.apply(v, p, g, method="match"), v, probe,
                          gallery)
  assert scores.shape == (c.eval.tile_p, c.eval.tile_g)
  layer = v["params"]["matcher"]["layers_1"]
  assert layer["linear1"]["kernel"].shape == (128, 512)
  assert "layers_2" not in v["params"]["matcher"]
  if m.name == "transformer_cat":
    assert v["params"]["matcher"]["pos_embed"].shape == (192, 128)
  else:
    assert set(v["params"]["encoder"]) >= {"backbone", "neck_conv", "layers_0", "layers_1"}
    assert "layers_2" not in v["params"]["encoder"]
