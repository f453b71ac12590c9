"""NFormer stage 2: set sampling, the refine path (query masking, determinism), training that
learns and resumes, and evaluation with refinement through `evaluate_matcher`."""
import jax
import numpy as np
import pytest

from configs import nformer as nformer_config
from jaxreid.methods.nformer import pipeline as nt
from jaxreid.eval.metrics import evaluate_ranking
from jaxreid.nn.norms import cosine_similarity
from jaxreid.nn.norms import l2_normalize
from jaxreid.methods.nformer.model import sample_landmarks
from test_nformer import dense_forward, random_params   # the dense reference of the paper

D = 32


def small_config(**nformer):
  c = nformer_config.get_config()
  c.nformer.update(dim=D, layers=2, heads=2, ffn=64, k=10, set_size=400, sets_per_step=1,
                   sets_per_epoch_divisor=30, epochs=3, lr=1e-3, log_every_steps=5,
                   checkpoint_every_steps=5, num_classes=0)
  c.nformer.update(nformer)
  return nt.resolve(c)


def clusters(num_ids, per_id, seed, noise=1.5, cams=6):
  """Identity centres + camera offsets + per-image noise; the same ids for any `seed`."""
  g = np.random.default_rng(42)
  centres, offsets = g.standard_normal((num_ids, D)), 0.6 * g.standard_normal((cams, D))
  rng = np.random.default_rng(seed)
  ids = np.repeat(np.arange(num_ids), per_id)
  cams_ = rng.integers(cams, size=len(ids))
  x = centres[ids] + offsets[cams_] + noise * rng.standard_normal((len(ids), D))
  return x.astype(np.float32), ids.astype(np.int32), cams_


def mean_ap(q, g, ids, cams, is_query):
  s = np.asarray(cosine_similarity(q, g))
  return 100 * evaluate_ranking(s, ids[is_query], ids[~is_query], cams[is_query],
                                cams[~is_query])["mAP"]


def random_variables(config, seed=0):
  """An NFormer's eval variables with non-trivial attention and BN statistics."""
  rng = np.random.default_rng(seed)
  params = dict(random_params(config.nformer.layers, seed=seed))
  params["bottleneck"] = {"scale": rng.uniform(0.5, 1.5, D).astype(np.float32)}
  stats = {"bottleneck": {"mean": 0.2 * rng.standard_normal(D).astype(np.float32),
                          "var": rng.uniform(0.5, 2, D).astype(np.float32)}}
  return {"params": params, "batch_stats": stats}


def test_sample_sets_official_rule_and_deterministic():
  x, ids, _ = clusters(30, 10, seed=0)
  a = nt.sample_sets(x, ids, sets=2, size=50, seed=3, step=7)
  b = nt.sample_sets(x, ids, sets=2, size=50, seed=3, step=7)
  c = nt.sample_sets(x, ids, sets=2, size=50, seed=3, step=8)
  np.testing.assert_array_equal(a["features"], b["features"])
  assert not np.array_equal(a["features"], c["features"])
  assert a["features"].shape == (2, 50, D) and a["labels"].shape == (2, 50)
  for s in a["features"]:                  # distinct rows, all among the centre's nearest 100
    rows = [int(np.flatnonzero((x == r).all(1))[0]) for r in s]
    assert len(set(rows)) == 50
  full = nt.sample_sets(x, ids, sets=1, size=300, seed=0, step=0)     # size = N: a permutation
  np.testing.assert_array_equal(np.sort(full["labels"][0]), np.sort(ids))
  with pytest.raises(ValueError, match="set size"):
    nt.sample_sets(x, ids, sets=1, size=301, seed=0, step=0)


def test_refine_masks_queries_and_is_deterministic():
  """refine = L2-normalise q+g, NFormer with queries masked from other queries, BNNeck (running
  statistics): equal to the dense definition; query_interaction = no mask; fixed landmarks."""
  config = small_config()
  variables = random_variables(config)
  x, _, _ = clusters(20, 8, seed=1)
  q, g = x[:30], x[30:]
  # block i's landmarks from fold_in(key(landmark_seed), i)
  landmarks = np.stack([sample_landmarks(jax.random.fold_in(jax.random.key(0), i), len(x), 5)
                        for i in range(config.nformer.layers)])
  unit = np.asarray(l2_normalize(x))
  bn = variables["batch_stats"]["bottleneck"]
  neck = lambda y: ((y - bn["mean"]) / np.sqrt(bn["var"] + 1e-5)
                    * variables["params"]["bottleneck"]["scale"])
  head_params = {k: v for k, v in variables["params"].items() if k.startswith("h_")}
  refine = nt.stage2_refiner(config, variables)
  rq, rg = refine(q, g)
  want = neck(dense_forward(head_params, unit, landmarks, 10, num_queries=30))
  np.testing.assert_allclose(np.concatenate([rq, rg]), want, atol=2e-3)
  rq2, rg2 = refine(q, g)
  np.testing.assert_array_equal(rq, rq2)
  np.testing.assert_array_equal(rg, rg2)
  with config.unlocked():
    config.nformer.query_interaction = True
  iq, ig = nt.stage2_refiner(config, variables)(q, g)
  want = neck(dense_forward(head_params, unit, landmarks, 10, num_queries=0))
  np.testing.assert_allclose(np.concatenate([iq, ig]), want, atol=2e-3)
  assert np.abs(iq - rq).max() > 1e-2


def test_stage2_learns_and_resumes(tmp_path):
  """Trained on clustered features, the refinement raises the mAP of fresh images of the same
  identities (untrained: ≈ the raw features); an interrupted run resumes to the same result."""
  config = small_config()
  x, ids, _ = clusters(60, 8, seed=0)                       # 480 training rows, 16 steps/epoch
  tx, tids, tcams = clusters(60, 6, seed=1)                 # fresh images of the same ids
  is_query = np.zeros(len(tids), bool)
  is_query[::6] = True
  raw = mean_ap(tx[is_query], tx[~is_query], tids, tcams, is_query)
  variables, state = nt.train_stage2(config, x, ids, 60, tmp_path / "full")
  assert int(state.step) == 3 * nt.steps_per_epoch(config.nformer, len(x))
  rq, rg = nt.stage2_refiner(config, variables)(tx[is_query], tx[~is_query])
  trained = mean_ap(rq, rg, tids, tcams, is_query)
  print({"raw": raw, "trained": trained})
  assert trained > raw + 2, (raw, trained)

  stopped = small_config(stop_at_step=7)
  assert nt.train_stage2(stopped, x, ids, 60, tmp_path / "split")[0] == {}
  resumed, _ = nt.train_stage2(config, x, ids, 60, tmp_path / "split")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), variables, resumed)


def test_stage2_with_features_extracted_every_epoch(tmp_path):
  """extract_view(epoch) is asked once per epoch (again for the epoch a resumed run re-enters),
  and the unnormalised view of that epoch is what the sets hold."""
  config = small_config(epochs=2, normalize_train=False, dropout=0.1, weight_decay=0.0,
                        set_metric="dot")
  x, ids, _ = clusters(30, 8, seed=0)
  calls = []

  def extract_view(epoch):
    calls.append(epoch)
    return 3.0 * x + epoch                       # unnormalised, different every epoch

  seen = []
  original = nt.sample_sets
  units = []
  nt.sample_sets = lambda f, *a, **k: (seen.append(f.copy()), units.append(k["unit"]),
                                       original(f, *a, **k))[2]
  try:
    nt.train_stage2(config, None, ids, 30, tmp_path / "a", extract_view=extract_view)
    assert calls == [0, 1]
    np.testing.assert_array_equal(seen[0], 3.0 * x)
    np.testing.assert_array_equal(seen[-1], 3.0 * x + 1)
    # official NFormerDataset: nearest rows by the raw dot product of the (unnormalised) rows
    np.testing.assert_array_equal(units[0], 3.0 * x)
    calls.clear()
    stopped = small_config(epochs=2, normalize_train=False, stop_at_step=3)
    nt.train_stage2(stopped, None, ids, 30, tmp_path / "b", extract_view=extract_view)
    nt.train_stage2(config, None, ids, 30, tmp_path / "b", extract_view=extract_view)
    assert calls == [0, 0, 1]                   # steps_per_epoch = 240 // 30 = 8 > 3
    units.clear()
    nt.train_stage2(small_config(epochs=1, normalize_train=False), None, ids, 30, tmp_path / "c",
                    extract_view=extract_view)      # cosine: the normalised rows
    np.testing.assert_allclose(units[0], 3.0 * x / np.linalg.norm(3.0 * x, axis=1,
                                                                    keepdims=True), rtol=1e-5)
  finally:
    nt.sample_sets = original
