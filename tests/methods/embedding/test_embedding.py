"""The embedding method (NFormer stage 1 / "Res50" baseline): its losses against brute-force NumPy,
the warmup + step schedule against its closed form, random erasing and the cosine scorer. That it
learns through the shared train / eval pipeline is tests/test_nformer_pipeline.py (stage 1)."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import embedding
from jaxreid import objectives as losses
from jaxreid.data.augment import ERASE_FILL, apply, draw
from jaxreid.models import init_variables
from jaxreid.registry import build_model
from jaxreid.train.optim import lr_schedule, make_optimizer


def test_label_smoothed_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits, labels, eps = rng.normal(size=(5, 7)) * 3, rng.integers(0, 7, 5), 0.1
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  q = np.full((5, 7), eps / 7)
  q[np.arange(5), labels] += 1 - eps
  expected = -(q * log_p).sum(1).mean()
  got = losses.cross_entropy_label_smooth(jnp.asarray(logits), jnp.asarray(labels), eps)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_batch_hard_triplet_matches_brute_force():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 5))
  labels = np.array([0, 0, 1, 1, 1, 2, 2, 3])       # id 3 has no positive: not an anchor
  total, count = 0.0, 0
  for i in range(8):
    pos = [np.linalg.norm(x[i] - x[j]) for j in range(8) if labels[j] == labels[i] and j != i]
    neg = [np.linalg.norm(x[i] - x[j]) for j in range(8) if labels[j] != labels[i]]
    if pos:
      total += max(max(pos) - min(neg) + 0.3, 0.0)
      count += 1
  got = losses.batch_hard_triplet_loss(jnp.asarray(x, jnp.float32), jnp.asarray(labels), 0.3)
  np.testing.assert_allclose(float(got), total / count, rtol=1e-4)


def test_center_loss_and_its_centre_gradient():
  rng = np.random.default_rng(2)
  x, centers, labels = rng.normal(size=(6, 4)), rng.normal(size=(3, 4)), np.array([0, 0, 1, 2, 2, 2])
  expected = np.mean([np.sum((x[i] - centers[labels[i]]) ** 2) for i in range(6)])
  args = (jnp.asarray(x), jnp.asarray(labels), jnp.asarray(centers))
  np.testing.assert_allclose(float(losses.center_loss(*args)), expected, rtol=1e-5)
  grad = jax.grad(losses.center_loss, argnums=2)(*args)
  expected_grad = np.zeros_like(centers)          # d/dc_y of mean ||x - c_y||² = -2 Σ (x - c) / B
  for i in range(6):
    expected_grad[labels[i]] -= 2 * (x[i] - centers[labels[i]]) / 6
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-6)


def test_warmup_step_schedule_matches_closed_form():
  config = embedding.get_config("market").train
  schedule = lr_schedule(config, steps_per_epoch=100)
  for epoch in (0, 1, 5, 8, 9, 10, 38, 39, 40, 68, 69, 70, 119):
    e = epoch + 1   # the official trainer: epoch e runs at the scheduler's last_epoch e + 1
    warm = 0.01 * (1 - e / 10) + e / 10 if e < 10 else 1.0
    expected = 3.5e-4 * warm * 0.1 ** sum(e >= m for m in (40, 70))
    for step in (epoch * 100, epoch * 100 + 99):  # constant within an epoch
      np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_random_erase_fills_one_rectangle_within_the_area_range():
  image = np.zeros((64, 32, 3), np.uint8)
  for seed in range(20):
    factors = draw(np.random.default_rng(seed), height=64, width=32, pad=0, flip=False,
                   rotate_deg=0.0, color_jitter=False, occlusion=False, random_erasing=1.0)
    out = np.asarray(apply(image[None], jax.tree.map(lambda x: x[None], factors)))[0]
    erased = np.all(out == ERASE_FILL, axis=-1)
    ys, xs = np.nonzero(erased)
    assert erased.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)        # one filled rectangle
    assert 0.01 * 64 * 32 <= erased.sum() <= 0.45 * 64 * 32
  assert not image.any()                                          # input untouched


def tiny_embedding(data_dir, **train):
  from training import tiny
  config = tiny(embedding.get_config(), data_dir, width=16, batch_size=32, **train)
  config.model.embed_dim = 32
  return config


def test_embedding_model_outputs_and_cosine_scores():
  config = tiny_embedding("unused")
  config.model.num_classes = 5
  model = build_model(config)
  variables = init_variables(model, jax.random.key(0), 64, 32)
  assert variables["params"]["head"]["classifier"]["kernel"].shape == (32, 5)
  assert "bias" not in variables["params"]["head"]["bottleneck"]   # BNNeck: frozen zero bias
  images = jax.random.uniform(jax.random.key(1), (4, 64, 32, 3))
  vectors = model.apply(variables, images, method="encode")
  assert vectors.shape == (4, 32)
  scores = np.asarray(model.apply(variables, vectors[:2], vectors, method="match"))
  v = np.asarray(vectors, np.float64)
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(scores, v[:2] @ v.T, atol=1e-5)


def test_optimizer_groups_cover_the_embedding_model():
  config = tiny_embedding("unused")
  config.model.num_classes = 5
  params = init_variables(build_model(config), jax.random.key(0), 64, 32)["params"]
  tx = make_optimizer(config.train, steps_per_epoch=10)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
