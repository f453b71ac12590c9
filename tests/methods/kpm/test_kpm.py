"""KPM against float64 NumPy references written from the paper's equations (Shen et al., CVPR
2018, Eq. 3-10 and Sec. 3.2) and a NumPy transcription of the authors' `RandomWalkEmbed.forward`;
tiled = untiled scoring; top-k re-scoring with k = G = the full matrix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid import registry
from jaxreid.api import load_config_file
from jaxreid.backbones.resnet import ResNet
from jaxreid.eval.metrics import evaluate_ranking
from jaxreid.eval.scoring import first_stage_scores, rescore_top_k, score_matrix
from jaxreid.methods import kpm
from jaxreid.methods.kpm.model import KPMMatcher, split_scales
from jaxreid.methods.kpm.objective import sample_pairs
from jaxreid.models import init_variables

SHAPES = ((2, 1, 16), (4, 2, 8), (8, 4, 4))    # (h, w, c) of the three scales, c halving
TAU, TAU_RSA = 0.05, 1.0


def perturbed(variables, seed):
  """Variables with every parameter moved and BN statistics made non-trivial."""
  rng = np.random.default_rng(seed)
  noisy = lambda x: np.asarray(x) + rng.normal(0, 0.3, np.shape(x)).astype(np.float32)
  out = {"params": jax.tree.map(noisy, variables["params"])}
  if "batch_stats" in variables:
    out["batch_stats"] = jax.tree.map(
        lambda x: (rng.uniform(0.5, 2.0, np.shape(x)) if np.all(np.asarray(x) == 1)
                   else rng.normal(0, 0.3, np.shape(x))).astype(np.float32),
        variables["batch_stats"])
  return out


def run(module, variables, *args, method=None):
  """module.apply jitted (eager Flax dispatch is slow on a busy CPU)."""
  return np.asarray(jax.jit(lambda v, *a: module.apply(v, *a, method=method))(variables, *args))


def packed(rng, n, shapes=SHAPES):
  """Random non-negative (post-ReLU-like) features in the encoder's packed [N, T, C_S] form."""
  flat = np.concatenate([rng.gamma(1.0, 1.0, (n, h * w * c)) for h, w, c in shapes], 1)
  return flat.reshape(n, -1, shapes[-1][2]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# float64 references from the paper


def softmax(z, axis=-1):
  z = z - z.max(axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis, keepdims=True)


def bn(x, params, stats):
  p, s = (jax.tree.map(lambda a: np.asarray(a, np.float64), t) for t in (params, stats))
  return (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_attention(x, rsa, rsa_stats):
  """RSA (Sec. 3.1.3): α = 1 + softmax_i(a_i / τ_RSA), a from two [1×1 conv, BN, ReLU] + 1×1."""
  k = lambda name: np.asarray(rsa[name]["kernel"], np.float64)
  h = np.maximum(bn(x @ k("conv1"), rsa["bn1"], rsa_stats["bn1"]), 0)
  h = np.maximum(bn(h @ k("conv2"), rsa["bn2"], rsa_stats["bn2"]), 0)
  a = (h @ k("conv3"))[:, 0] + np.asarray(rsa["conv3"]["bias"], np.float64)[0]
  return 1.0 + softmax(a / TAU_RSA)


def ref_difference(x, y, alpha):
  """Eq. 5: β_ij = softmax_j(x̄_iᵀȳ_j / τ); Eq. 8: Δ = X − βY; Eq. 10: δ = Σ_i α_i Δ_i."""
  beta = softmax(unit(x) @ unit(y).T / TAU, axis=1)
  delta_map = x - beta @ y
  return (alpha[:, None] * delta_map).sum(0)


def ref_pair(x_feat, y_feat, variables):
  """(per-scale α, per-scale δ, logit) of one pair (float64)."""
  params, stats = variables["params"], variables["batch_stats"]
  xs = [np.asarray(a, np.float64)[0] for a in split_scales(jnp.asarray(x_feat[None]), SHAPES)]
  ys = [np.asarray(a, np.float64)[0] for a in split_scales(jnp.asarray(y_feat[None]), SHAPES)]
  alphas, deltas, feats = [], [], []
  for s, (x, y) in enumerate(zip(xs, ys)):
    alpha = ref_attention(x, params[f"rsa_{s}"], stats[f"rsa_{s}"])
    delta = ref_difference(x, y, alpha)
    alphas.append(alpha)
    deltas.append(delta)
    feats.append(bn(delta**2, params[f"bn_{s}"], stats[f"bn_{s}"]))   # square → BN
  head = params["classifier"]
  logit = (np.concatenate(feats) @ np.asarray(head["kernel"], np.float64))[0] + float(
      head["bias"][0])
  return alphas, deltas, logit


@pytest.fixture(scope="module")
def paper():
  matcher = KPMMatcher(SHAPES, rsa_channels=6)
  rng = np.random.default_rng(0)
  probe, gallery = packed(rng, 2), packed(rng, 3)
  variables = perturbed(jax.jit(matcher.init)(jax.random.key(0), probe, gallery), 1)
  return matcher, variables, probe, gallery


def test_paper_scales_rsa_and_head_equal_the_numpy_reference(paper):
  matcher, variables, probe, gallery = paper
  scores = run(matcher, variables, probe, gallery)
  deltas = jax.jit(lambda v, p, g: matcher.apply(v, p, g, method="differences"))(
      variables, probe, gallery)
  for p in range(2):
    for g in range(3):
      alphas, want_deltas, want_logit = ref_pair(probe[p], gallery[g], variables)
      for s in range(3):        # one pair at each scale
        np.testing.assert_allclose(np.asarray(deltas[s])[p, g], want_deltas[s], rtol=2e-4,
                                   atol=2e-4)
      np.testing.assert_allclose(scores[p, g], want_logit, rtol=2e-4, atol=2e-4)
  # RSA alone
  xs = split_scales(jnp.asarray(probe), SHAPES)
  for s in range(3):
    got = run(matcher, variables, xs[s], method=lambda m, x, s=s: m.rsa[s](x, False))
    want = ref_attention(np.asarray(xs[s][1], np.float64), variables["params"][f"rsa_{s}"],
                         variables["batch_stats"][f"rsa_{s}"])
    np.testing.assert_allclose(np.asarray(got)[1], want, rtol=1e-5, atol=1e-6)
  # the paired form (training) is the diagonal of the cross form
  pairs = run(matcher, variables, probe[[0, 1, 1]], gallery[[2, 0, 1]], method="pairs")
  np.testing.assert_allclose(pairs, scores[[0, 1, 1], [2, 0, 1]], rtol=1e-5, atol=1e-5)


def test_a_different_temperature_changes_the_scores(paper):
  matcher, variables, probe, gallery = paper
  other = KPMMatcher(SHAPES, rsa_channels=6, tau=1.0)
  assert not np.allclose(run(matcher, variables, probe, gallery),
                         run(other, variables, probe, gallery), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# The authors' RandomWalkEmbed (reid/models/embedding.py), transcribed to NumPy, NCHW


def kron_matching(x0, x1):
  """kron.py: every feature vector of x0 convolved with x1 → N × H × W × H × W."""
  n, c, h, w = x0.shape
  out = np.zeros((n, h, w, h, w))
  for i in range(h):
    for j in range(w):
      out[:, i, j] = np.einsum("nc,nchw->nhw", x0[:, :, i, j], x1)
  return out


def random_walk_embed(probe_x, gallery_x, bn_p, bn_s, cls_w, cls_b, temp=1.0):
  """RandomWalkEmbed.forward(probe_x, gallery_x, p2g=True) in eval mode → [P, G, 2]."""
  n_probe, c, h, w = probe_x.shape
  n_gallery = gallery_x.shape[0]
  probe_x = np.broadcast_to(probe_x[:, None], (n_probe, n_gallery, c, h, w)).reshape(-1, c, h, w)
  gallery_x = np.broadcast_to(gallery_x[None], (n_probe, n_gallery, c, h, w)).reshape(-1, c, h, w)
  x1, x2 = gallery_x, probe_x                       # _kron_matching(gallery_x, probe_x)
  n = x1.shape[0]
  x2_kro = kron_matching(x1 / np.linalg.norm(x1, axis=1, keepdims=True),
                         x2 / np.linalg.norm(x2, axis=1, keepdims=True))
  att = softmax((temp * x2_kro).reshape(n * h * w, h * w), axis=1).reshape(n, h * w, h * w)
  warped = np.matmul(x2.reshape(n, c, h * w), att.transpose(0, 2, 1)).reshape(n, c, h, w)
  diff = (warped - gallery_x).mean((2, 3))           # avg_pool2d over the whole map
  diff = diff ** 2
  diff = bn(diff, bn_p, bn_s)                         # dropout: identity in eval
  out = diff @ np.asarray(cls_w, np.float64).T + np.asarray(cls_b, np.float64)
  return out.reshape(n_probe, n_gallery, 2)


def test_released_variant_equals_random_walk_embed():
  groups, shape = 2, (4, 2, 12)
  matcher = KPMMatcher((shape,), variant="released", tau=1.0, groups=groups)
  rng = np.random.default_rng(3)
  probe = rng.gamma(1.0, 1.0, (2, *shape)).astype(np.float32)
  gallery = rng.gamma(1.0, 1.0, (3, *shape)).astype(np.float32)
  variables = perturbed(jax.jit(matcher.init)(jax.random.key(1), probe, gallery), 4)
  scores = run(matcher, variables, probe, gallery)
  p64 = np.asarray(probe, np.float64).transpose(0, 3, 1, 2)
  g64 = np.asarray(gallery, np.float64).transpose(0, 3, 1, 2)
  count = shape[2] // groups
  outputs = []   # evaluators.compute_random_walk without the random walk: mean over (h, j)
  for h in range(groups):
    params, stats = variables["params"], variables["batch_stats"]
    cls = params[f"classifier_{h}"]
    for j in range(groups):
      chunk = slice(j * count, (j + 1) * count)
      outputs.append(random_walk_embed(p64[:, chunk], g64[:, chunk], params[f"bn_{h}"],
                                       stats[f"bn_{h}"], np.asarray(cls["kernel"]).T,
                                       cls["bias"]))
  out = np.mean(outputs, 0)
  np.testing.assert_allclose(scores, out[..., 1] - out[..., 0], rtol=1e-4, atol=1e-5)
  pairs = run(matcher, variables, probe[[1, 0]], gallery[[0, 2]], method="pairs")
  np.testing.assert_allclose(pairs, scores[[1, 0], [0, 2]], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The hourglass (Sec. 3.2) on a tiny ResNet


def tiny_config(**model):
  config = load_config_file("configs/kpm.py")
  config.model.update(depth=18, width=8, rsa_channels=6, **model)
  config.data.update(height=64, width=32)
  return config


def upsample2(x):
  """Bilinear ×2 of [h, w, c], PyTorch's align_corners=False (half-pixel, edge-clamped)."""
  def axis(n):
    src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0)
    i0 = np.floor(src).astype(int)
    return i0, np.minimum(i0 + 1, n - 1), src - i0
  (r0, r1, fr), (c0, c1, fc) = axis(x.shape[0]), axis(x.shape[1])
  rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
  return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def test_hourglass_equals_the_numpy_reference():
  config = tiny_config()
  model = registry.build_model(config)
  variables = perturbed(init_variables(model, jax.random.key(2), 64, 32), 5)
  images = np.random.default_rng(6).integers(0, 256, (2, 64, 32, 3), dtype=np.uint8)
  feats = run(model, variables, images, method="encode")
  shapes = kpm.shapes(config)
  assert shapes == ((2, 1, 64), (4, 2, 32), (8, 4, 16))
  enc_p, enc_s = variables["params"]["encoder"], variables["batch_stats"]["encoder"]
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  x = ((images / 255.0 - mean) / std).astype(np.float32)
  stage = {}
  for layer in ("layer2", "layer3", "layer4"):   # the backbone's own maps, from a plain ResNet
    resnet = ResNet(depth=18, ibn="b", final_layer=layer, last_stride=2, width=8,
                    freeze_bn=False)
    stage[layer] = run(resnet, {"params": enc_p["backbone"], "batch_stats": enc_s["backbone"]},
                       x).astype(np.float64)
  conv = lambda name, m: m @ np.asarray(enc_p[name]["kernel"], np.float64)[0, 0] + np.asarray(
      enc_p[name]["bias"], np.float64)
  for b in range(2):
    maps = [stage["layer4"][b]]
    for s, layer in ((1, "layer3"), (2, "layer2")):
      maps.append(upsample2(conv(f"reduce_{s}", maps[-1]))
                  + conv(f"lateral_{s}", stage[layer][b]))
    got = split_scales(feats[b:b + 1], shapes)
    for s, (want, (h, w, c)) in enumerate(zip(maps, shapes)):
      assert want.shape == (h, w, c)
      np.testing.assert_allclose(np.asarray(got[s])[0], want.reshape(h * w, c), rtol=1e-4,
                                 atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------
# Scoring: tiles, top-k re-scoring


def test_tiled_scores_equal_untiled(paper):
  matcher, variables, _, _ = paper
  rng = np.random.default_rng(7)
  probe, gallery = packed(rng, 5), packed(rng, 7)
  fn = lambda v, p, g: matcher.apply(v, p, g)
  whole = score_matrix(fn, variables, probe, gallery, tile_p=8, tile_g=8)
  tiled = score_matrix(fn, variables, probe, gallery, tile_p=2, tile_g=3)
  tol = 1e-6 * np.abs(whole).max()
  np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=tol)
  np.testing.assert_allclose(whole, run(matcher, variables, probe, gallery), rtol=1e-5, atol=tol)


def test_top_k_rescoring(paper):
  matcher, variables, _, _ = paper
  rng = np.random.default_rng(8)
  probe, gallery = packed(rng, 5), packed(rng, 7)
  fn = lambda v, p, g: matcher.apply(v, p, g)
  full = score_matrix(fn, variables, probe, gallery, tile_p=8, tile_g=8)
  pooled = lambda f: run(matcher, variables, f, method="global_features")
  first = first_stage_scores(pooled(probe), pooled(gallery))
  pids_q, pids_g = np.array([0, 1, 2, 0, 1]), np.array([0, 0, 1, 1, 2, 2, 3])
  cams_q, cams_g = np.zeros(5, int), np.ones(7, int)
  # k = G: every entry re-scored → the full matrix and its metrics
  same = rescore_top_k(fn, variables, probe, gallery, first, 7, tile_p=2, tile_g=3)
  tol = 1e-6 * np.abs(full).max()
  np.testing.assert_allclose(same, full, rtol=1e-5, atol=tol)
  a = evaluate_ranking(same, pids_q, pids_g, cams_q, cams_g, max_rank=7)
  b = evaluate_ranking(full, pids_q, pids_g, cams_q, cams_g, max_rank=7)
  np.testing.assert_allclose(a["cmc"], b["cmc"])
  assert a["mAP"] == pytest.approx(b["mAP"]) and a["mINP"] == pytest.approx(b["mINP"])
  # k < G: the first stage's top-k carry the matcher's scores, ranked above all others, which
  # keep their first-stage order
  k = 3
  part = rescore_top_k(fn, variables, probe, gallery, first, k, tile_p=2, tile_g=2)
  for i in range(5):
    top = np.argsort(-first[i], kind="stable")[:k]
    rest = np.setdiff1d(np.arange(7), top)
    np.testing.assert_allclose(part[i, top], full[i, top], rtol=1e-5, atol=tol)
    assert part[i, rest].max() < part[i, top].min()
    assert list(rest[np.argsort(-part[i, rest])]) == list(rest[np.argsort(-first[i, rest])])
  with pytest.raises(ValueError, match="first_stage must be"):
    rescore_top_k(fn, variables, probe, gallery, first[:2], k)


# ------------------------------------------------------------------------------------------------
# Pair sampling, correspondences, errors


def test_sample_pairs_draws_positives_and_negatives_at_the_ratio():
  labels = jnp.asarray(np.repeat(np.arange(4), 4))        # P = 4 ids × K = 4
  anchor, partner, target, weight = sample_pairs(labels, jax.random.key(0), 3, 9)
  anchor, partner, target, weight = map(np.asarray, (anchor, partner, target, weight))
  lab = np.asarray(labels)
  assert len(anchor) == 16 * 12 and weight.all()
  assert (target == (lab[anchor] == lab[partner])).all()
  assert (anchor != partner).all()
  assert target.sum() * 3 == (1 - target).sum()               # 1 : 3
  pos = {(a, p) for a, p, t in zip(anchor, partner, target) if t}
  assert len(pos) == 16 * 3                                   # every positive, no repeats
  # an anchor with fewer positives than asked for: the extra draws weigh nothing
  labels = jnp.asarray([0, 0, 1, 2, 3, 4])
  _, partner, target, weight = map(np.asarray, sample_pairs(labels, jax.random.key(1), 2, 2))
  assert weight[target == 1].sum() == 2 and weight[target == 0].all()


def test_correspondences_follow_the_attention(paper):
  matcher, variables, probe, gallery = paper
  out = kpm.correspondences({"params": {"matcher": variables["params"]}}, probe, gallery)
  betas = jax.jit(lambda v, p, g: matcher.apply(v, p, g, method="attention"))(
      variables, probe, gallery)
  for s, beta in enumerate(betas, start=1):
    np.testing.assert_array_equal(out[f"scale{s}_probe_to_gallery"], np.argmax(beta, 3))
  assert out["probe_to_gallery"].shape == (1, 2, 3, 2)
  np.testing.assert_array_equal(out["probe_to_gallery"][0], out["scale1_probe_to_gallery"])


@pytest.mark.parametrize("change, message", [
    (dict(neck=16), "KPM has no neck"),
    (dict(variant="dense"), "model.variant='dense' is unknown"),
    (dict(final_layer="layer3"), "hourglass needs model.final_layer"),
    (dict(scales=4), "model.scales=4 must be"),
    (dict(variant="released", scales=1, groups=5), "model.groups=5 does not divide"),
    (dict(variant="released", scales=3), "released KPM variant matches one scale"),
])
def test_user_mistakes_get_one_clear_error(change, message):
  config = tiny_config(**change)
  with pytest.raises(ValueError, match=message):
    model = registry.build_model(config)
    jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 64, 32))


def test_features_of_another_model_are_rejected(paper):
  matcher, variables, probe, gallery = paper
  with pytest.raises(ValueError, match="values per image, but the model's scales"):
    matcher.apply(variables, probe[:, :-1], gallery[:, :-1])
