"""PAT's parts against independent references: the part-aware mask against a NumPy transcription
of the authors' `attn_mask_generate` and against the rule written pair by pair; float32
evaluation and float32 part tokens under bfloat16 training; masked attention against a dense NumPy computation; CSL, PSD and the soft-margin
triplet against brute-force NumPy on a small bank; the memory bank's update order (sequential,
first visit stores, before the loss)."""
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxreid.backbones.vit import Attention
from jaxreid.methods.pat import model as pat_model
from jaxreid.methods.pat import objective as obj


def rule_mask(rects, h, w):
  """The mask rule of the paper / docs, decided for each (query, key) pair on its own."""
  n = 4 + h * w

  def region(p, t):     # is token t (≥ 4) a patch in part p's region?
    r, c = divmod(t - 4, w)
    top, bottom, left, right = rects[p]
    return top <= r <= bottom and left <= c <= right

  out = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      qp, kp = 1 <= q <= 3, 1 <= k <= 3
      if not qp and not kp:                     # cls / patches among themselves
        out[q, k] = True
      elif q == 0 or k == 0:                    # cls ↔ parts
        out[q, k] = True
      elif qp and kp:                           # a part sees itself only
        out[q, k] = q == k
      elif qp:                                  # part → its region's patches
        out[q, k] = region(q - 1, k)
      else:                                     # patch → the parts whose region holds it
        out[q, k] = region(k - 1, q)
  return out


def official_2d_mask(h, w, left, top, width, height, part, cls_label, sample):
  """NumPy transcription of the authors' `generate_2d_mask`; `sample(population, 2)` stands in
  for their `random.sample`."""
  h, w, left, top, width, height = (int(v) for v in (h, w, left, top, width, height))
  assert left + width <= w and top + height <= h
  l, r = sorted(sample(range(left, left + width + 1), 2))
  t, b = sorted(sample(range(top, top + height + 1), 2))
  grid = np.zeros((h, w))
  grid[t:b + 1, l:r + 1] = 1
  vec = np.zeros(4 + h * w)
  vec[4:] = grid.reshape(-1)
  vec[part] = 1
  vec[0] = 1 if cls_label else 0
  return np.outer(vec, vec)


def official_attn_mask(n, h, w, sample):
  """NumPy transcription of the authors' `attn_mask_generate(N, H, W)` (bool [N, N])."""
  ones = np.ones((n, 1))
  ones[1:4, 0] = 0
  mask = (ones @ ones.T).astype(bool)
  mask |= official_2d_mask(h, w, 0, 0, w, h / 2, 1, False, sample).astype(bool)
  mask |= official_2d_mask(h, w, 0, h / 4, w, h / 2, 2, False, sample).astype(bool)
  mask |= official_2d_mask(h, w, 0, h / 2, w, h / 2, 3, False, sample).astype(bool)
  mask[1:4, 0] = True
  mask[0, 1:4] = True
  return mask


def full_band(population, k):
  """`random.sample` forced to the whole band: its first and last bound."""
  return [population[0], population[-1]]


@pytest.mark.parametrize("h,w", [(16, 8), (8, 4), (18, 9), (19, 10), (7, 3)])
def test_evaluation_mask_is_the_authors_mask_with_full_bands(h, w):
  want = official_attn_mask(4 + h * w, h, w, full_band)
  got = np.asarray(pat_model.part_mask(jnp.asarray(pat_model.bands(h, w)), h, w))
  np.testing.assert_array_equal(got, want)


def test_random_regions_give_the_authors_mask_for_the_same_draws():
  h, w = 16, 8
  for seed in range(10):
    rects = np.asarray(pat_model.random_rectangles(jax.random.key(seed), h, w))
    draws = iter([v for t, b, l, r in rects for v in ((l, r), (t, b))])  # columns, then rows

    def sample(population, k):
      pick = list(next(draws))
      assert k == 2 and pick[0] != pick[1] and all(v in population for v in pick)
      return pick

    want = official_attn_mask(4 + h * w, h, w, sample)
    np.testing.assert_array_equal(np.asarray(pat_model.part_mask(jnp.asarray(rects), h, w)),
                                  want)


def test_eval_is_float32_and_part_tokens_leave_a_float32_norm_under_bf16():
  from configs import pat
  from jaxreid.models import init_variables

  def build(bf16):
    c = pat.get_config()
    c.model.update(vit_dim=16, vit_depth=2, vit_heads=2, num_classes=5)
    c.train.bf16 = bf16
    return pat_model.build(c)

  x = np.random.default_rng(0).integers(0, 256, (2, 64, 32, 3), dtype=np.uint8)
  v = init_variables(build(False), jax.random.key(0), 64, 32)
  f32 = build(False).apply(v, x, method="encode")
  bf16 = build(True).apply(v, x, method="encode")
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), rtol=1e-6, atol=1e-6)
  (cls, parts, _), _ = build(True).apply(
      v, x, method="train_outputs", mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(1), "mask": jax.random.key(2)})
  for out in (cls, parts):   # the final LayerNorm in float32: not all values on the bf16 grid
    assert out.dtype == jnp.float32
    assert np.any(np.asarray(out) != np.asarray(out.astype(jnp.bfloat16).astype(jnp.float32)))


@pytest.mark.parametrize("h,w", [(16, 8), (8, 4)])
def test_evaluation_mask_is_the_full_bands(h, w):
  rects = pat_model.bands(h, w)
  if (h, w) == (16, 8):   # rows 0–8, 4–12, 8–15 (clipped), all columns
    np.testing.assert_array_equal(rects, [[0, 8, 0, 8], [4, 12, 0, 8], [8, 16, 0, 8]])
  got = np.asarray(pat_model.part_mask(jnp.asarray(rects), h, w))
  np.testing.assert_array_equal(got, rule_mask(rects, h, w))


def test_training_masks_are_random_sub_rectangles_of_the_bands():
  h, w = 16, 8
  seen = set()
  for seed in range(40):
    rects = np.asarray(pat_model.random_rectangles(jax.random.key(seed), h, w))
    for (t, b, l, r), (bt, bb, bl, br) in zip(rects, pat_model.bands(h, w)):
      assert bt <= t < b <= bb and bl <= l < r <= br
    seen.add(tuple(rects.ravel()))
    got = np.asarray(pat_model.part_mask(jnp.asarray(rects), h, w))
    np.testing.assert_array_equal(got, rule_mask(rects, h, w))
  assert len(seen) == 40


def test_masked_attention_matches_dense_numpy():
  b, n, d, heads = 2, 9, 12, 3
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  mask = rng.random((n, n)) < 0.5
  np.fill_diagonal(mask, True)
  mod = Attention(d, heads, qkv_bias=True)
  v = mod.init(jax.random.key(0), x)
  v = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), v)
  got = np.asarray(mod.apply(v, x, mask))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  hd = d // heads
  out = np.zeros((b, n, d))
  for i in range(b):
    for hh in range(heads):
      q = qkv[i, :, hh * hd:(hh + 1) * hd]
      k = qkv[i, :, d + hh * hd:d + (hh + 1) * hd]
      val = qkv[i, :, 2 * d + hh * hd:2 * d + (hh + 1) * hd]
      logits = np.where(mask, q @ k.T / np.sqrt(hd), -1e3)
      wts = np.exp(logits - logits.max(1, keepdims=True))
      wts = wts / wts.sum(1, keepdims=True) * mask
      out[i, :, hh * hd:(hh + 1) * hd] = wts @ val
  want = out @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def small_bank(rng, m=12, d=5, filled=None):
  bank = rng.normal(size=(3, m, d)).astype(np.float32)
  filled = np.ones(m, bool) if filled is None else filled
  return {"bank": jnp.asarray(bank), "filled": jnp.asarray(filled),
          "labels": jnp.asarray(rng.integers(0, 4, m), jnp.int32)}


def brute_csl(parts, memory, index, k, kind, scale, tau):
  bank, filled = np.asarray(memory["bank"], np.float64), np.asarray(memory["filled"])
  losses, neighbours = [], [[] for _ in range(len(index))]
  for p in range(3):
    for i, own in enumerate(index):
      f = np.asarray(parts[i, p], np.float64)
      cand = [j for j in range(bank.shape[1]) if filled[j] and j != own]
      if kind == "euclidean":
        s = {j: -scale * np.sum((f - bank[p, j]) ** 2) for j in cand}
      else:
        s = {j: f @ bank[p, j] / np.linalg.norm(f) / np.linalg.norm(bank[p, j]) / tau
             for j in cand}
      order = sorted(cand, key=lambda j: -s[j])[:k]
      neighbours[i] += order
      if not cand:
        losses.append(0.0)
        continue
      pos = np.log(sum(np.exp(s[j]) for j in order))
      losses.append(np.log(sum(np.exp(s[j]) for j in cand)) - pos)
  return np.mean(losses), neighbours


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_csl_matches_brute_force(kind):
  rng = np.random.default_rng(1)
  filled = np.ones(12, bool)
  filled[[2, 7]] = False            # not yet visited: no part in the loss
  memory = small_bank(rng, filled=filled)
  parts = rng.normal(size=(4, 3, 5)).astype(np.float32)
  index = np.array([0, 3, 5, 11])
  k = 4
  got, slots, valid = obj.csl_loss(jnp.asarray(parts), memory, jnp.asarray(index), k, kind,
                                   scale=0.3, temperature=0.5)
  want, neighbours = brute_csl(parts, memory, index, k, kind, 0.3, 0.5)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  slots = np.asarray(slots).reshape(4, 3, k)
  for i in range(4):
    for p in range(3):
      assert list(slots[i, p]) == neighbours[i][p * k:(p + 1) * k]
  assert np.asarray(valid).all()


def test_psd_and_id_loss_match_brute_force():
  rng = np.random.default_rng(2)
  b, c, k3 = 4, 6, 9
  logits = rng.normal(size=(b, c)).astype(np.float32)
  labels = np.array([0, 1, 2, 5])
  nb = rng.integers(0, c, (b, k3))
  valid = np.ones((b, k3), bool)
  valid[3, 5:] = False
  lam, alpha, eps = 0.5, 0.5, 0.1
  soft = np.asarray(obj.soft_labels(jnp.asarray(labels), jnp.asarray(nb), jnp.asarray(valid), c,
                                    lam))
  got = float(obj.id_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(soft), eps,
                          alpha))
  total = 0.0
  for i in range(b):
    ids = Counter(int(v) for v, ok in zip(nb[i], valid[i]) if ok)
    want_soft = np.array([(1 - lam) * (j == labels[i]) + lam * ids[j] / sum(ids.values())
                          for j in range(c)])
    np.testing.assert_allclose(soft[i], want_soft, rtol=1e-6, atol=1e-7)
    logp = logits[i] - np.log(np.sum(np.exp(logits[i])))
    smooth = np.array([(1 - eps) * (j == labels[i]) + eps / c for j in range(c)])
    total += (1 - alpha) * -(smooth @ logp) + alpha * -(want_soft @ logp)
  np.testing.assert_allclose(got, total / b, rtol=1e-5)


def test_soft_margin_triplet_matches_brute_force():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 6)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  got = float(obj.soft_margin_triplet(jnp.asarray(x), jnp.asarray(labels)))
  want = []
  for i in range(8):
    d = [np.linalg.norm(x[i] - x[j]) for j in range(8)]
    ap = max(d[j] for j in range(8) if labels[j] == labels[i])
    an = min(d[j] for j in range(8) if labels[j] != labels[i])
    want.append(np.log1p(np.exp(ap - an)))
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def test_bank_update_is_sequential_and_first_visit_stores():
  rng = np.random.default_rng(4)
  filled = np.array([True, False, True, False, True, True])
  memory = small_bank(rng, m=6, d=3, filled=filled)
  parts = rng.normal(size=(4, 3, 3)).astype(np.float32)
  index = np.array([1, 2, 2, 4])            # slot 2 twice: blended twice, in batch order
  labels = np.array([7, 8, 8, 9])
  new = obj.update_bank(memory, jnp.asarray(parts), jnp.asarray(index), jnp.asarray(labels), 0.1)
  want = np.array(memory["bank"])
  have = filled.copy()
  for i, j in enumerate(index):
    want[:, j] = 0.9 * want[:, j] + 0.1 * parts[i] if have[j] else parts[i]
    have[j] = True
  np.testing.assert_allclose(np.asarray(new["bank"]), want, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new["filled"]), have)
  assert list(np.asarray(new["labels"])[[1, 2, 4]]) == [7, 8, 9]


class FixedOutputs(nn.Module):
  """Stands in for PATModel: train_outputs returns parameters (class token, parts, logits)."""
  parts: np.ndarray

  @nn.compact
  def train_outputs(self, images):
    parts = self.param("parts", lambda *_: jnp.asarray(self.parts))
    cls = parts.mean(1)
    return cls, parts, cls @ jnp.ones((cls.shape[-1], 4))

  def __call__(self, images):
    return self.train_outputs(images)


def test_the_loss_sees_the_bank_updated_by_its_own_batch():
  rng = np.random.default_rng(5)
  memory = small_bank(rng, m=10, d=5)
  parts = rng.normal(size=(4, 3, 5)).astype(np.float32)
  index, labels = np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1])
  module = FixedOutputs(parts)
  variables = {"params": {"parts": jnp.asarray(parts)}, "batch_stats": {}}
  cfg = ml_collections.ConfigDict(dict(
      label_smoothing=0.1, triplet_weight=1.0, pat=dict(
          csl_weight=1.0, k=3, memory_momentum=0.1, csl_similarity="euclidean", csl_scale=0.2,
          csl_temperature=0.02, soft_labels=True, soft_weight=0.5, soft_lambda=0.5)))
  state = type("S", (), {"memory": memory, "rng": jax.random.key(0), "step": 0})()
  batch = {"image": jnp.zeros((4, 8, 4, 3)), "label": jnp.asarray(labels),
           "index": jnp.asarray(index)}
  _, (_, new_memory, metrics) = obj.PAT.loss(module, variables, state, batch, cfg)
  updated = obj.update_bank(memory, jnp.asarray(parts), jnp.asarray(index),
                            jnp.asarray(labels), 0.1)
  np.testing.assert_allclose(np.asarray(new_memory["bank"]), np.asarray(updated["bank"]))
  want_new, _ = brute_csl(parts, updated, index, 3, "euclidean", 0.2, 0.02)
  want_old, _ = brute_csl(parts, memory, index, 3, "euclidean", 0.2, 0.02)
  assert abs(want_new - want_old) > 1e-3
  np.testing.assert_allclose(float(metrics["csl"]), want_new, rtol=1e-5)
  assert obj.PAT.update_memory(memory, new_memory, batch, cfg) is new_memory
