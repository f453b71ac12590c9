"""TransMatcher decoder against a NumPy reference written from the papers and docs/methods, its symmetry, the
paper Table 3 switches and the encoder wiring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import transmatcher as tm_config
from jaxreid.methods.transmatcher.model import TransMatcher
from jaxreid.backbones.resnet import ResNet
from jaxreid.models import FeatureMapEncoder, TransformerMapEncoder
from jaxreid.registry import build_model

RESNET18 = ResNet(depth=18, ibn="b", width=8)   # the encoder backbone of these tests

H, W, D_MODEL, FFN, N = 4, 2, 6, 10, 2
S = H * W
EPS = 1e-5


def randomized(variables, seed=0):
  """Every parameter random (not just the init), BN running stats random and valid."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  out = {}
  for path, x in flat.items():
    if path[0] == "batch_stats" and path[-1] == "var":
      out[path] = rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    else:
      out[path] = (rng.standard_normal(x.shape) * 0.7).astype(np.float32)
  return traverse_util.unflatten_dict(out)


def maps(num, seed):
  return np.random.default_rng(seed).standard_normal((num, N, H, W, D_MODEL)).astype(np.float32)


def make_matcher(blocks=(3, 2, 4), **switches):
  """blocks: gallery maps and probes per similarity product, pairs per head block (None: the
  backend's defaults); the default ones leave padded last blocks for 5 × 7 maps."""
  gallery_chunk, probe_chunk, head_block = blocks
  module = TransMatcher(H, W, num_layers=N, ffn=FFN, gallery_chunk=gallery_chunk,
                        probe_chunk=probe_chunk, head_block=head_block, **switches)
  variables = module.init(jax.random.key(0), maps(2, 9), maps(2, 9))
  return module, randomized(variables)


def bn(x, scale, bias, mean, var, train, axes=None):
  if train:
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
  return (x - mean) / np.sqrt(var + EPS) * scale + bias


def reference_scores(v, probe, gallery, train=False, fc1=True, bn1=True, mlp_head1=True,
                     prior_embed=True):
  """TransMatcher decoder (paper Sec. 3, docs/methods/transmatcher.md), in float64 NumPy loops over layers."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), v["params"])
  stats = jax.tree.map(lambda x: np.asarray(x, np.float64), v["batch_stats"])
  total = 0.0
  for n in range(N):
    q = probe[:, n].reshape(len(probe), S, D_MODEL).astype(np.float64)
    k = gallery[:, n].reshape(len(gallery), S, D_MODEL).astype(np.float64)
    if fc1:
      q = q @ params["fc1_kernel"][n] + params["fc1_bias"][n]
      k = k @ params["fc1_kernel"][n] + params["fc1_bias"][n]
    s = np.einsum("ptd,grd->pgtr", q, k)
    if prior_embed:
      s = s / (1 + np.exp(-params["prior"][n]))
    pooled = np.stack([s.max(3), s.max(2)], axis=2)   # [P, G, 2, S]
    lp, ls = params[f"layers_{n}"], stats[f"layers_{n}"]
    x = pooled
    if bn1:
      x = bn(x, lp["bn1"]["scale"][0], lp["bn1"]["bias"][0], ls["bn1"]["mean"][0],
             ls["bn1"]["var"][0], train)
    if mlp_head1:
      x = x @ lp["fc2"]["kernel"] + lp["fc2"]["bias"]
      x = bn(x, lp["bn2"]["scale"], lp["bn2"]["bias"], ls["bn2"]["mean"], ls["bn2"]["var"],
             train, axes=(0, 1, 2))
      x = np.maximum(x, 0)
    x = (x @ lp["fc3"]["kernel"] + lp["fc3"]["bias"])[..., 0].sum(-1)   # [P, G]
    total = total + bn(x, lp["bn3"]["scale"][0], lp["bn3"]["bias"][0], ls["bn3"]["mean"][0],
                       ls["bn3"]["var"][0], train)
  nrm_p, nrm_s = params["norm"], stats["norm"]
  return bn(total, nrm_p["scale"][0], nrm_p["bias"][0], nrm_s["mean"][0], nrm_s["var"][0], train)


SWITCH_SETS = [{}, dict(fc1=False, bn1=False, mlp_head1=False, prior_embed=False)]


@pytest.mark.parametrize("blocks", [(3, 2, 4), (None, None, None), (8, 8, 64)],
                         ids=["padded_blocks", "default_blocks", "one_block"])
@pytest.mark.parametrize("switches", SWITCH_SETS, ids=["all_on", "all_off"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_decoder_equals_numpy_reference(switches, train, blocks):
  """fc1 folded onto the probe side, blocked products and blocked heads give the paper's
  decoder (the reference projects both sides)."""
  module, v = make_matcher(blocks, **switches)
  probe, gallery = maps(5, 1), maps(7, 2)
  got = module.apply(v, probe, gallery, train, mutable=["batch_stats"] if train else False)
  got = got[0] if train else got
  want = reference_scores(v, probe, gallery, train, **switches)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_swapping_probe_and_gallery_transposes_iff_prior_is_symmetric():
  """fc1 is shared and both directions share one head and are summed, so swapping the inputs
  swaps the two max-poolings — the score matrix transposes exactly when sigmoid(R_n) is
  symmetric (R_n = R_nᵀ) or the prior is off. A general learned R_n breaks the symmetry."""
  module, v = make_matcher()
  a, b = maps(4, 3), maps(5, 4)
  score = lambda v, p, g: np.asarray(module.apply(v, p, g))
  asym = score(v, a, b), score(v, b, a).T
  assert np.abs(asym[0] - asym[1]).max() > 1e-2

  sym = jax.tree.map(lambda x: x, v)
  prior = np.asarray(v["params"]["prior"])
  sym["params"]["prior"] = (prior + prior.transpose(0, 2, 1)) / 2
  np.testing.assert_allclose(score(sym, a, b), score(sym, b, a).T, rtol=1e-5, atol=1e-5)

  module_np, v_np = make_matcher(prior_embed=False)
  s1 = np.asarray(module_np.apply(v_np, a, b))
  s2 = np.asarray(module_np.apply(v_np, b, a)).T
  np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)


def tiny_config(**model):
  config = tm_config.get_config()
  config.model.update(**{**dict(depth=18, width=8, neck=8, ffn=16, num_layers=2, encoders=1),
                         **model})
  return config


def param_names(config):
  model = build_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 64, 32, 3))))
  return {"/".join(k) for k in traverse_util.flatten_dict(shapes["params"])
          if k[1] != "backbone"}


def test_table3_switches_change_the_parameter_tree():
  base = param_names(tiny_config())
  removed = {"fc1": {"matcher/fc1_kernel", "matcher/fc1_bias"},
             "bn1": {f"matcher/layers_{i}/bn1/{p}" for i in range(2) for p in ("scale", "bias")},
             "mlp_head1": {f"matcher/layers_{i}/{m}/{p}" for i in range(2)
                           for m, p in (("fc2", "kernel"), ("fc2", "bias"), ("bn2", "scale"),
                                        ("bn2", "bias"))},
             "prior_embed": {"matcher/prior"}}
  for switch, names in removed.items():
    assert names <= base
    assert param_names(tiny_config(**{switch: False})) == base - names, switch
  assert param_names(tiny_config(pos_embed=True)) == base | {"encoder/pos_embed"}
  assert param_names(tiny_config(encoders=2)) == base | {
      k.replace("layers_0", "layers_1") for k in base if k.startswith("encoder/layers_0")}
  no_mlp = build_model(tiny_config(mlp_head1=False))
  shapes = jax.eval_shape(lambda: no_mlp.init(jax.random.key(0), jnp.zeros((2, 64, 32, 3))))
  assert shapes["params"]["matcher"]["layers_0"]["fc3"]["kernel"].shape == (8, 1)  # S → 1


def test_flipped_switches_train_one_step():
  """One full train step (encoder, matcher, optimiser groups) with every switch flipped, in the
  paper's bf16 compute mode."""
  from jaxreid import registry
  from jaxreid.train.loop import create_train_state, make_train_step
  from jaxreid.train.optim import LR_GROUPS, _group_labels, make_optimizer
  config = tiny_config(fc1=False, bn1=False, mlp_head1=False, prior_embed=False,
                       pos_embed=True, encoders=2)
  config.train.bf16 = True
  config.model.map_dtype = "bfloat16"
  model = build_model(config)
  tx = make_optimizer(config.train, steps_per_epoch=10)
  objective = registry.method_of(config).objectives[config.train.loss]
  state = create_train_state(config, model, tx, objective, num_classes=4, num_images=8,
                             rng=jax.random.key(0))
  labels = _group_labels(state.params, LR_GROUPS)
  assert labels["encoder"]["layers_0"]["in_proj"]["kernel"] == "new"
  assert labels["encoder"]["pos_embed"] == "new"
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 64, 32, 3)), jnp.uint8),
           "label": jnp.asarray(np.repeat(np.arange(4), 2), jnp.int32)}
  maps = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                     method="encode")
  assert maps.dtype == jnp.bfloat16 and maps.shape == (8, 2, 4, 2, 8)
  new, metrics = jax.jit(make_train_step(model, tx, objective, config.train))(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       state.params, new.params)
  assert moved["encoder"]["pos_embed"] and moved["encoder"]["layers_1"]["linear2"]["kernel"]
  assert moved["matcher"]["layers_0"]["fc3"]["kernel"]
  assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("setting", sorted(tm_config.PAPER))
def test_paper_settings(setting):
  c = tm_config.get_config(setting)
  m, t, d = c.model, c.train, c.data
  assert (m.name, m.depth, m.ibn, m.freeze_bn, m.neck, m.ffn, m.num_layers, m.encoders,
          m.heads) == ("transmatcher", 50, "b", True, 512, 2048, 3, 2, 1)
  assert (d.sampler, d.batch_size, d.num_instances, d.height, d.width) == ("gs", 64, 4, 384, 128)
  assert (t.loss, t.lr, t.backbone_lr_mult, t.clip_norm, t.bf16) == ("pairwise", 0.005, 0.1, 4.0,
                                                                     True)
  epochs = (4, (2,)) if setting == "randperson" else (15, (10,))
  assert (t.epochs, tuple(t.lr_step_epochs)) == epochs
  assert m.fc1 and m.bn1 and m.mlp_head1 and m.prior_embed and not m.pos_embed
  assert m.map_dtype == "bfloat16"


@pytest.mark.parametrize("encoders", [1, 2])
def test_encoder_wiring(encoders):
  """encoders = N - 1: decoder 1 reads the neck output; encoders = N: decoder n reads enc_n."""
  enc = TransformerMapEncoder(RESNET18, neck=8, num_layers=2, encoders=encoders, ffn=16,
                              normalize=False)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64, 32, 3)), jnp.uint8)
  v = enc.init(jax.random.key(0), images)
  out = enc.apply(v, images)
  assert out.shape == (2, 2, 4, 2, 8)
  features = FeatureMapEncoder(RESNET18, neck=8, normalize=False)
  neck = features.apply({"params": {k: v["params"][k] for k in ("backbone", "neck_conv")},
                         "batch_stats": v["batch_stats"]}, images)
  same = np.allclose(out[:, 0], neck, atol=1e-6)
  assert same == (encoders == 1)
  with pytest.raises(ValueError, match="model.encoders=3"):
    TransformerMapEncoder(RESNET18, neck=8, num_layers=2, encoders=3).init(
        jax.random.key(0), images)


def test_xavier_uniform_init():
  """Every ≥2-D matcher parameter is xavier-uniform: fc1/fc2/fc3 over (fan_in, fan_out), R_n as
  the official [1, 1, S, S] tensor (fan S·S each way)."""
  module = TransMatcher(H, W, num_layers=N, ffn=FFN)
  params = module.init(jax.random.key(1), maps(2, 9), maps(2, 9))["params"]
  bounds = {"fc1_kernel": (params["fc1_kernel"], np.sqrt(6 / (2 * D_MODEL))),
            "prior": (params["prior"], np.sqrt(6 / (2 * S * S))),
            "fc2": (params["layers_0"]["fc2"]["kernel"], np.sqrt(6 / (S + FFN))),
            "fc3": (params["layers_1"]["fc3"]["kernel"], np.sqrt(6 / (FFN + 1)))}
  for name, (x, bound) in bounds.items():
    x = np.abs(np.asarray(x))
    assert x.max() <= bound and x.max() > 0.6 * bound, name
  assert not np.allclose(params["prior"][0], params["prior"][1])   # one draw per layer


@pytest.mark.parametrize("chunks", [(1, 1), (2, 2), (8, None)])
def test_projected_similarities_equal_brute_force_for_any_blocks(chunks):
  """Max-pooled prior-weighted similarities (plus a per-probe-location offset) against a float64
  loop over pairs, with probe and gallery counts that do not divide the blocks (padded)."""
  from jaxreid.methods.transmatcher.model import projected_similarities
  gallery_chunk, probe_chunk = chunks
  rng = np.random.default_rng(gallery_chunk)
  p_num, g_num, n, s, d = 3, 5, 2, 6, 4
  probe, gallery = rng.standard_normal((p_num, n, s, d)), rng.standard_normal((g_num, n, s, d))
  prior = rng.uniform(0.1, 1.0, (n, s, s))
  offset = rng.standard_normal((p_num, n, s))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = np.asarray(projected_similarities(f32(probe), f32(gallery), f32(prior), gallery_chunk,
                                          probe_chunk, f32(offset)))
  want = np.empty((p_num, g_num, n, 2, s))
  for i in range(p_num):
    for j in range(g_num):
      for layer in range(n):
        sim = (probe[i, layer] @ gallery[j, layer].T + offset[i, layer][:, None]) * prior[layer]
        want[i, j, layer, 0], want[i, j, layer, 1] = sim.max(1), sim.max(0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
