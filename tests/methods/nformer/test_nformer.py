"""NFormer: the gathered (O(N·k)) LAA + RNS against dense N×N NumPy references of their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid.methods.nformer.model import NFormer, nformer_apply, reciprocal_neighbours, sample_landmarks

D, HEADS = 32, 2


def features(n, d=D, seed=0):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def dense_neighbours(x, k):
  """Brute force: dense cosine similarity, self first, top-k by argsort; dense reciprocal mask."""
  x = x.astype(np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  s = x @ x.T
  np.fill_diagonal(s, np.inf)
  top = np.argsort(-s, axis=1, kind="stable")[:, :k]
  member = np.zeros(s.shape, bool)
  member[np.arange(len(x))[:, None], top] = True
  return top, member & member.T                       # M_ij = [j ∈ topk(i)]·[i ∈ topk(j)]


def dense_forward(params, x, landmarks, k, num_queries=0, heads=HEADS, eps=1e-5):
  """The NFormer definition on dense N×N arrays (float64): A = (Q·K_Lᵀ)(Q_L·Kᵀ)/√d_head, masked
  softmax over each row with the dense reciprocal mask (queries masked from other queries).
  landmarks: [l] for every block, or [L, l] one row per block."""
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = x.astype(np.float64)
  n, d = x.shape
  dh = d // heads
  _, m = dense_neighbours(x, k)
  q_rows = np.arange(n) < num_queries
  m = m & ~(q_rows[:, None] & q_rows[None, :] & ~np.eye(n, dtype=bool))
  ln = lambda y, p: ((y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + eps)
                     * p["scale"] + p["bias"])
  lin = lambda y, p: y @ p["kernel"] + p["bias"]
  gelu = lambda y: 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
  for i in range(len(params)):
    p = params[f"h_{i}"]
    lm = np.asarray(landmarks)
    lm = lm[i] if lm.ndim == 2 else lm
    q, kk, v = np.split(lin(x, p["attn"]["c_attn"]), 3, axis=1)
    out = []
    for h in range(heads):
      sl = slice(h * dh, (h + 1) * dh)
      qh, kh, vh = q[:, sl], kk[:, sl], v[:, sl]
      a = (qh @ kh[lm].T) @ (qh[lm] @ kh.T) / np.sqrt(dh)
      a = np.where(m, a, -np.inf)
      w = np.exp(a - a.max(1, keepdims=True))
      out.append((w / w.sum(1, keepdims=True)) @ vh)
    n1 = ln(x + lin(np.concatenate(out, 1), p["attn"]["c_proj"]), p["ln_1"])
    x = ln(n1 + lin(gelu(lin(n1, p["mlp"]["c_fc"])), p["mlp"]["c_proj"]), p["ln_2"])
  return x


def random_params(layers=2, seed=0, scale=0.3, qkv_scale=0.12):
  """Parameters with attention logits O(1): weights neither uniform nor one-hot."""
  model = NFormer(dim=D, heads=HEADS, ffn=64, layers=layers)
  params = model.init(jax.random.key(seed), features(8), jax.random.key(0))["params"]
  params = {k: v for k, v in params.items() if k.startswith("h_")}   # the blocks only
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: a + (qkv_scale if "c_attn" in jax.tree_util.keystr(path) else scale)
      * rng.standard_normal(a.shape).astype(np.float32), params)


def blocks_output(model, params, x, key, **kwargs):
  """The module's pre-BN output (its blocks) with block parameters `params`."""
  variables = {"params": {**params, "bottleneck": {"scale": jnp.ones(D)}},
               "batch_stats": {"bottleneck": {"mean": jnp.zeros(D), "var": jnp.ones(D)}}}
  return model.apply(variables, x, key, **kwargs)[0]


def test_reciprocal_neighbours_equals_brute_force():
  x = features(300)
  idx, mask = reciprocal_neighbours(x, k=7, block=64)   # 300 is not a multiple of 64: padding
  top, m = dense_neighbours(x, 7)
  np.testing.assert_array_equal(np.asarray(idx), top)
  np.testing.assert_array_equal(np.asarray(mask), m[np.arange(300)[:, None], top])
  assert np.all(np.asarray(idx)[:, 0] == np.arange(300)) and np.all(np.asarray(mask)[:, 0])


def test_laa_equals_factorised_definition():
  """One block, its attention logits over the neighbours = (Q·K_Lᵀ)(Q_L·Kᵀ)/√d_head computed
  directly (checked through the full block output, which is a function of these logits)."""
  x = features(200, seed=1)
  params = {"h_0": random_params(1)["h_0"]}
  lm = np.array([3, 50, 7, 199, 120])
  got = nformer_apply(params, x, lm, k=10, heads=HEADS, block=64)
  np.testing.assert_allclose(np.asarray(got), dense_forward(params, x, lm, 10), atol=1e-3)


def test_rns_gather_equals_dense_masked_softmax_with_isolated_rows():
  """Outliers far from everything have only themselves as reciprocal neighbour; their RNS
  weight is all on themselves and the gathered form still equals the dense masked softmax."""
  x = features(150, seed=2)
  x[:5] = 0.01 * x[:5]
  x[:5, 0] = 100.0 * np.arange(1, 6)                     # rows 0..4 point almost along e_0
  x[5:, 0] = -np.abs(x[5:, 0]) - 3.0                     # everyone else away from e_0
  x[:5] += np.random.default_rng(3).standard_normal((5, D)).astype(np.float32)  # no ties
  idx, mask = reciprocal_neighbours(x, k=4)
  top, m = dense_neighbours(x, 4)
  isolated = np.asarray(mask).sum(1) == 1
  assert isolated.sum() >= 1, "the test set-up should create rows with no reciprocal neighbour"
  params = random_params(2, seed=4)
  lm = np.array([10, 20, 30, 40, 50])
  got = np.asarray(nformer_apply(params, x, lm, k=4, heads=HEADS, block=32))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, dense_forward(params, x, lm, 4), atol=1e-3)


def test_all_landmarks_makes_output_independent_of_the_key():
  x = features(40, seed=5)
  model = NFormer(dim=D, heads=HEADS, ffn=64, layers=2, k=6, num_landmarks=40, block=16)
  params = random_params(2, seed=6)
  a = blocks_output(model, params, x, jax.random.key(1))
  b = blocks_output(model, params, x, jax.random.key(2))
  assert not np.array_equal(np.asarray(sample_landmarks(jax.random.key(1), 40, 40)),
                            np.asarray(sample_landmarks(jax.random.key(2), 40, 40)))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_same_key_same_output_and_landmarks_matter():
  x = features(120, seed=7)
  model = NFormer(dim=D, heads=HEADS, ffn=64, layers=2, k=8, block=50)
  params = random_params(2, seed=8)
  a = np.asarray(blocks_output(model, params, x, jax.random.key(3)))
  b = np.asarray(blocks_output(model, params, x, jax.random.key(3)))
  c = np.asarray(blocks_output(model, params, x, jax.random.key(4)))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3


def test_query_masking_equals_definition():
  x = features(160, seed=9)
  params = random_params(2, seed=10)
  lm = np.array([1, 60, 90, 120, 150])
  got = nformer_apply(params, x, lm, num_queries=40, k=12, heads=HEADS, block=64)
  np.testing.assert_allclose(np.asarray(got), dense_forward(params, x, lm, 12, num_queries=40),
                             atol=1e-3)


def test_query_masking_perturbation():
  """One block: perturbing query 0 (not a landmark) leaves every other query's output unchanged
  as long as their neighbour lists stay the same; with query interaction it changes some."""
  n, nq, k = 200, 60, 10
  x = features(n, seed=11)
  x[1] = x[0] + 0.1 * features(1, seed=14)[0]   # queries 0 and 1 are reciprocal neighbours
  params = {"h_0": random_params(1, seed=12)["h_0"]}
  lm = np.array([100, 120, 140, 160, 180])
  y = x.copy()
  y[0] = x[0] + 0.02 * features(1, seed=13)[0]
  nx, ny = reciprocal_neighbours(x, k), reciprocal_neighbours(y, k)
  def as_sets(nb):                               # the output ignores the neighbours' order,
    idx, mask = map(np.asarray, nb)              # and queries never see other queries
    mask = mask & ~((idx < nq) & (idx != np.arange(n)[:, None]))
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(mask, order, 1)
  for a, b in zip(as_sets(nx), as_sets(ny)):     # other queries' neighbour data unchanged
    np.testing.assert_array_equal(a[1:nq], b[1:nq])
  before = np.asarray(nformer_apply(params, x, lm, num_queries=nq, k=k, block=64))
  after = np.asarray(nformer_apply(params, y, lm, num_queries=nq, k=k, block=64))
  np.testing.assert_allclose(before[1:nq], after[1:nq], atol=1e-6)
  inter_b = np.asarray(nformer_apply(params, x, lm, num_queries=0, k=k, block=64))
  inter_a = np.asarray(nformer_apply(params, y, lm, num_queries=0, k=k, block=64))
  assert np.asarray(nx[0])[1, 1] == 0 and np.asarray(nx[1])[1, 1]
  assert np.abs(inter_b[1] - inter_a[1]).max() > 1e-3


def test_invalid_arguments():
  with pytest.raises(ValueError, match="k="):
    reciprocal_neighbours(features(5), k=6)
  with pytest.raises(ValueError, match="num_landmarks"):
    sample_landmarks(jax.random.key(0), 4, 5)


def test_attention_weights_are_not_degenerate():
  """Guards the other tests: with random_params the RNS weights are spread (not one-hot)."""
  x = features(100, seed=15)
  p = random_params(1, seed=16)["h_0"]
  c = p["attn"]["c_attn"]
  q, k, _ = np.split(x @ np.asarray(c["kernel"]) + np.asarray(c["bias"]), 3, axis=1)
  lm = np.arange(5)
  a = (q[:, :16] @ k[lm, :16].T) @ (q[lm, :16] @ k[:, :16].T) / 4
  idx, mask = map(np.asarray, reciprocal_neighbours(x, 10))
  logits = np.where(mask, np.take_along_axis(a, idx, 1), -np.inf)
  w = np.exp(logits - logits.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  assert np.median(w.max(1)[mask.sum(1) > 2]) < 0.9


def test_gradients_are_finite_with_masked_neighbours():
  """Stage-2 training differentiates through the masked softmax: no NaN from the -inf logits."""
  x = features(64, seed=17)
  model = NFormer(dim=D, heads=HEADS, ffn=64, layers=2, k=8, block=32)
  params = random_params(2, seed=18)
  loss = lambda p, f: (blocks_output(model, p, f, jax.random.key(0), num_queries=10) ** 2).sum()
  gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(gp))
  assert np.isfinite(np.asarray(gx)).all() and np.abs(np.asarray(gx)).max() > 0


def test_landmarks_are_drawn_per_block():
  """The module's blocks use block_landmarks: block i from fold_in(key, i) (the official
  attention draws at every call); a dense forward with one shared draw differs."""
  x = features(60, seed=19)
  model = NFormer(dim=D, heads=HEADS, ffn=64, layers=2, k=8, block=32)
  params = random_params(2, seed=20)
  key = jax.random.key(5)
  per_block = np.stack([sample_landmarks(jax.random.fold_in(key, i), 60, 5) for i in range(2)])
  assert not np.array_equal(per_block[0], per_block[1])
  got = np.asarray(blocks_output(model, params, x, key))
  np.testing.assert_allclose(got, dense_forward(params, x, per_block, 8), atol=1e-3)
  assert np.abs(got - dense_forward(params, x, per_block[0], 8)).max() > 1e-3


def test_dropout_on_attention_projection_and_mlp_outputs():
  """dropout p: x ← LN(x + drop(c_proj(u))), x ← LN(x + drop(MLP(x))), inverted scaling
  (official RESID_PDROP); masks from fold_in(key, block), split per row block and use."""
  n, p = 40, 0.3
  x = features(n, seed=21)
  params = random_params(2, seed=22)
  lm = np.array([3, 9, 17, 25, 33])
  key = jax.random.key(7)
  got = np.asarray(nformer_apply(params, x, lm, k=6, heads=HEADS, block=n, dropout=p,
                                 dropout_key=key))
  masks = []
  for i in range(2):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i), (1, 2))[0]
    masks.append([np.asarray(jax.random.bernoulli(k, 1 - p, (n, D))) / (1 - p) for k in (k1, k2)])
  # dense reference with the two dropout sites: re-run block by block
  y = x.astype(np.float64)
  _, m = dense_neighbours(x, 6)
  eps, dh = 1e-5, D // HEADS
  pr = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  ln = lambda v, q: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + eps) \
      * q["scale"] + q["bias"]
  lin = lambda v, q: v @ q["kernel"] + q["bias"]
  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
  for i in range(2):
    b = pr[f"h_{i}"]
    q, kk, v = np.split(lin(y, b["attn"]["c_attn"]), 3, axis=1)
    out = []
    for h in range(HEADS):
      sl = slice(h * dh, (h + 1) * dh)
      a = (q[:, sl] @ kk[lm, sl].T) @ (q[lm, sl] @ kk[:, sl].T) / np.sqrt(dh)
      a = np.where(m, a, -np.inf)
      w = np.exp(a - a.max(1, keepdims=True))
      out.append(w / w.sum(1, keepdims=True) @ v[:, sl])
    n1 = ln(y + masks[i][0] * lin(np.concatenate(out, 1), b["attn"]["c_proj"]), b["ln_1"])
    y = ln(n1 + masks[i][1] * lin(gelu(lin(n1, b["mlp"]["c_fc"])), b["mlp"]["c_proj"]), b["ln_2"])
  np.testing.assert_allclose(got, y, atol=1e-3)
  plain = np.asarray(nformer_apply(params, x, lm, k=6, heads=HEADS, block=n))
  np.testing.assert_allclose(plain, dense_forward(params, x, lm, 6), atol=1e-3)
  assert np.abs(got - plain).max() > 1e-2
  # the module: dropout only while training, from the 'dropout' rng
  model = NFormer(dim=D, heads=HEADS, ffn=64, layers=2, k=6, block=n, dropout=p)
  variables = {"params": {**params, "bottleneck": {"scale": jnp.ones(D)}},
               "batch_stats": {"bottleneck": {"mean": jnp.zeros(D), "var": jnp.ones(D)}}}
  ev = model.apply(variables, x, jax.random.key(1))[0]
  np.testing.assert_allclose(np.asarray(ev), np.asarray(model.clone(dropout=0.0).apply(
      variables, x, jax.random.key(1))[0]), atol=1e-6)
  tr = lambda r: model.apply(variables, x[None], jax.random.key(1), train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.key(r)})[0][0]
  assert np.abs(np.asarray(tr(0)) - np.asarray(tr(1))).max() > 1e-2
