"""evaluate_ranking against a per-query brute-force reference of the protocol."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid.eval import evaluate_ranking


def reference(scores, qids, gids, qcams, gcams, max_rank):
  """One query at a time: filter, rank, then CMC / AP by explicit thresholds / INP."""
  first_ranks, aps, inps = [], [], []
  for i in range(len(qids)):
    keep = ~((gids == qids[i]) & (gcams == qcams[i]))
    s, matches = scores[i][keep], gids[keep] == qids[i]
    if not matches.any():
      continue
    ranked = [matches[j] for j in sorted(range(len(s)), key=lambda j: (-s[j], j))]
    hit_positions = [r for r, m in enumerate(ranked) if m]
    first_ranks.append(hit_positions[0])
    inps.append(len(hit_positions) / (hit_positions[-1] + 1))
    # sklearn: one (precision, recall) point per distinct score, predicted positive = s >= t.
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
      predicted = s >= t
      tp = (predicted & matches).sum()
      recall = tp / matches.sum()
      ap += (recall - prev_recall) * tp / predicted.sum()
      prev_recall = recall
    aps.append(ap)
  first_ranks = np.array(first_ranks)
  cmc = np.array([(first_ranks <= r).mean() for r in range(max_rank)])
  return cmc, np.mean(aps), np.mean(inps), len(aps)


def random_problem(seed, num_p=40, num_g=90, num_ids=12, num_cams=3):
  rng = np.random.default_rng(seed)
  scores = np.round(rng.normal(size=(num_p, num_g)), 1)  # many ties
  qids = rng.integers(0, num_ids + 3, num_p)  # ids >= num_ids never appear in the gallery
  gids = rng.integers(0, num_ids, num_g)
  qcams, gcams = rng.integers(0, num_cams, num_p), rng.integers(0, num_cams, num_g)
  # A query whose only gallery matches share its camera: it must be skipped too.
  gids[gids == 1] = 2
  gids[:3], gcams[:3], qids[0], qcams[0] = 1, 0, 1, 0
  return scores, qids, gids, qcams, gcams


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("query_block", [None, 7])
def test_matches_brute_force(seed, query_block):
  scores, qids, gids, qcams, gcams = random_problem(seed)
  got = evaluate_ranking(scores, qids, gids, qcams, gcams, max_rank=20, query_block=query_block)
  cmc, m_ap, m_inp, n = reference(scores, qids, gids, qcams, gcams, 20)
  assert 0 < got["num_valid_queries"] == n < len(qids)
  assert got["cmc"].dtype == np.float64 and got["cmc"].shape == (20,)
  np.testing.assert_allclose(got["cmc"], cmc, atol=1e-12)
  assert got["mAP"] == pytest.approx(m_ap, abs=1e-12)
  assert got["mINP"] == pytest.approx(m_inp, abs=1e-12)


def test_ties_form_one_threshold():
  # Gallery: match, non-match, match with the same score. Ranks follow gallery order, AP doesn't.
  scores = np.array([[0.5, 0.5, 0.5]])
  got = evaluate_ranking(scores, [1], [1, 2, 1], [0], [1, 1, 1], max_rank=3)
  np.testing.assert_allclose(got["cmc"], [1, 1, 1])
  assert got["mAP"] == pytest.approx(2 / 3)
  assert got["mINP"] == pytest.approx(2 / 3)
  got = evaluate_ranking(scores, [1], [2, 1, 1], [0], [1, 1, 1], max_rank=3)
  np.testing.assert_allclose(got["cmc"], [0, 1, 1])
  assert got["mAP"] == pytest.approx(2 / 3)


def test_against_sklearn():
  from sklearn import metrics   # a dev requirement: this cross-check always runs
  scores, qids, gids, qcams, gcams = random_problem(3)
  aps = []
  for i in range(len(qids)):
    keep = ~((gids == qids[i]) & (gcams == qcams[i]))
    y = gids[keep] == qids[i]
    if y.any():
      aps.append(metrics.average_precision_score(y, scores[i][keep]))
  got = evaluate_ranking(scores, qids, gids, qcams, gcams)
  assert got["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)


def test_perfect_ranking_and_jax_input():
  ids = np.arange(10)
  scores = jnp.eye(10) + 0.01 * jnp.arange(10)
  got = evaluate_ranking(scores, jnp.asarray(ids), ids, np.zeros(10, int), np.ones(10, int),
                         max_rank=5)
  np.testing.assert_array_equal(got["cmc"], np.ones(5))
  assert got["mAP"] == 1.0 and got["mINP"] == 1.0 and got["num_valid_queries"] == 10


def test_cmc_beyond_gallery_size_is_flat():
  got = evaluate_ranking(np.array([[0.1, 0.9]]), [0], [0, 1], [0], [1, 1], max_rank=4)
  np.testing.assert_allclose(got["cmc"], [0, 1, 1, 1])
  assert got["mAP"] == pytest.approx(0.5) and got["mINP"] == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, name", [
    ({"scores": np.zeros(5)}, "scores"),
    ({"query_ids": np.zeros(3)}, "query_ids"),
    ({"gallery_ids": np.zeros(4)}, "gallery_ids"),
    ({"query_cams": np.zeros((4, 1))}, "query_cams"),
    ({"gallery_cams": np.zeros(6)}, "gallery_cams"),
    ({"scores": np.zeros((0, 5)), "query_ids": np.zeros(0), "query_cams": np.zeros(0)},
     "empty"),
])
def test_bad_shapes(kwargs, name):
  args = {"scores": np.zeros((4, 5)), "query_ids": np.zeros(4), "gallery_ids": np.zeros(5),
          "query_cams": np.zeros(4), "gallery_cams": np.ones(5)}
  with pytest.raises(ValueError, match=name):
    evaluate_ranking(**{**args, **kwargs})


def test_no_valid_query_raises():
  with pytest.raises(ValueError, match="true match"):
    evaluate_ranking(np.zeros((2, 3)), [0, 1], [0, 5, 6], [0, 0], [0, 1, 1])
