"""rerank against a direct, unblocked NumPy k-reciprocal re-ranking written from the paper."""
import numpy as np
import pytest

from jaxreid import rerank
from jaxreid.eval import rerank as rerank_module


def reference(qg, qq, gg, k1, k2, lam):
  """Zhong et al. 2017, one item at a time on the dense (P+G)² matrix (distances not squared)."""
  p = len(qg)
  d = np.block([[qq, qg], [qg.T, gg]]).astype(np.float32)
  d = (d / d.max(axis=0)).T
  n = len(d)
  ranks = np.argsort(d, axis=1, kind="stable")

  def reciprocal(i, k):                 # R(i, k): i's k+1 nearest that have i among theirs
    return {int(j) for j in ranks[i, :k + 1] if i in ranks[j, :k + 1]}

  v = np.zeros((n, n), np.float32)
  for i in range(n):
    r = reciprocal(i, k1)
    expanded = set(r)
    for c in r:
      rc = reciprocal(c, int(np.around(k1 / 2)))
      if len(rc & r) > 2 / 3 * len(rc):
        expanded |= rc
    idx = np.array(sorted(expanded), int)
    w = np.exp(-d[i, idx])
    v[i, idx] = w / w.sum()
  if k2 != 1:
    v = np.stack([v[ranks[i, :k2]].mean(axis=0) for i in range(n)])
  jaccard = np.zeros((p, n), np.float32)
  for i in range(p):
    for j in range(n):
      shared = np.minimum(v[i], v[j]).sum()
      jaccard[i, j] = 1 - shared / (2 - shared)
  return (jaccard * (1 - lam) + d[:p] * lam)[:, p:]


def random_distances(rng, p, g, ties=False, dim=6):
  """Distances 1 - sigmoid(s/10) of noisy pair scores; QQ/GG slightly asymmetric like a matcher."""
  x = rng.normal(size=(p + g, dim))
  s = 10 * x @ x.T / dim + rng.normal(scale=0.5, size=(p + g, p + g))
  d = 1 - 1 / (1 + np.exp(-s / 10))
  if ties:
    d = np.round(d, 2)
  return d[:p, p:], d[:p, :p], d[p:, p:]


@pytest.mark.parametrize("p, g, k1, k2", [
    (1, 30, 20, 6), (5, 8, 20, 6), (1, 3, 20, 6), (12, 40, 20, 6), (30, 60, 6, 3),
    (20, 50, 5, 1), (7, 25, 3, 10)])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(p, g, k1, k2, ties):
  rng = np.random.default_rng(p * 1000 + g + k1)
  qg, qq, gg = random_distances(rng, p, g, ties)
  got = rerank(qg, qq, gg, k1=k1, k2=k2, lambda_value=0.3)
  want = reference(qg, qq, gg, k1, k2, 0.3)
  assert got.shape == (p, g) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_small_blocks_and_memmap(tmp_path, monkeypatch):
  """Many blocks and Jaccard steps (and memmapped GG) give the same result as one."""
  rng = np.random.default_rng(3)
  qg, qq, gg = random_distances(rng, 25, 70)
  want = rerank(qg, qq, gg)
  monkeypatch.setattr(rerank_module, "_BLOCK_ELEMENTS", 300)
  monkeypatch.setattr(rerank_module, "_PAIRS_PER_STEP", 50)
  path = tmp_path / "gg.npy"
  np.save(path, gg)
  got = rerank(qg, qq, np.load(path, mmap_mode="r"))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p, g, k1, k2, block_columns", [
    (25, 70, 20, 6, None), (12, 40, 6, 3, 7), (5, 33, 3, 1, 64)])
def test_gg_block_function_equals_in_memory(tmp_path, monkeypatch, p, g, k1, k2, block_columns):
  """GG given as column blocks (asymmetric, with ties), written to a memmap under block_dir in
  the neighbour pass: the in-memory result exactly, each block asked for once and in order, the
  memmap deleted on return."""
  rng = np.random.default_rng(p + g)
  qg, qq, gg = random_distances(rng, p, g, ties=True)
  want = rerank(qg, qq, gg, k1=k1, k2=k2)
  monkeypatch.setattr(rerank_module, "_BLOCK_ELEMENTS", 300)
  monkeypatch.setattr(rerank_module, "_PAIRS_PER_STEP", 50)
  monkeypatch.setattr(rerank_module, "_FETCH_ELEMENTS", 5 * g)
  asked, seen = [], []

  def columns(start, stop):
    asked.append((start, stop))
    seen.extend(tmp_path.glob("rerank_gg_*/gg_columns.npy"))
    return gg[:, start:stop].T.copy()

  got = rerank(qg, qq, columns, k1=k1, k2=k2, block_dir=tmp_path, block_columns=block_columns)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got, reference(qg, qq, gg, k1, k2, 0.3), rtol=2e-6, atol=2e-6)
  starts, stops = zip(*asked)
  assert starts[0] == 0 and stops[-1] == g and list(starts[1:]) == list(stops[:-1])
  width = block_columns or 5
  assert all(b - a == min(width, g - a) for a, b in asked)
  assert seen and not list(tmp_path.iterdir())


def test_gg_block_function_checks_its_blocks():
  qg, qq, gg = random_distances(np.random.default_rng(0), 4, 9)
  with pytest.raises(ValueError, match="must return"):
    rerank(qg, qq, lambda a, b: gg[:-1, a:b].T)    # a gallery item short
  with pytest.raises(ValueError, match="NaN"):
    rerank(qg, qq, lambda a, b: np.full((b - a, 9), np.nan))


def test_all_ties_and_lambda_one():
  """Constant distances: everything ties; λ = 1 returns the column-normalised distances."""
  qg, qq, gg = np.full((3, 5), 0.5), np.full((3, 3), 0.5), np.full((5, 5), 0.5)
  np.testing.assert_allclose(rerank(qg, qq, gg), reference(qg, qq, gg, 20, 6, 0.3), atol=1e-6)
  np.testing.assert_allclose(rerank(qg, qq, gg, lambda_value=1.0), np.ones((3, 5)))


@pytest.mark.parametrize("args, match", [
    ((np.ones((2, 3)), np.ones((2, 2)), np.ones((4, 4))), "g_g_dist"),
    ((np.ones((2, 3)), np.ones((3, 3)), np.ones((3, 3))), "q_q_dist"),
    ((np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3))), "positive maximum"),
])
def test_bad_inputs(args, match):
  with pytest.raises(ValueError, match=match):
    rerank(*args)


@pytest.fixture(scope="module")
def untrained(synthetic_data_dir):
  """A tiny untrained QAConv-GS with rerank and TLift on, testing on synthetic_reid/domain_b."""
  import jax

  from configs import qaconv_gs
  from jaxreid import parallel
  from jaxreid.models import init_variables
  from jaxreid.registry import build_model
  from training import tiny
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir)
  config.eval.update(rerank=True, tlift=True, retrieval_top_k=5)
  model = build_model(config)
  variables = init_variables(model, jax.random.key(0), config.data.height, config.data.width)
  return config, model, variables, parallel.make_mesh()


def test_evaluate_matcher_reports_table_2_rows(untrained, tmp_path):
  from jaxreid.eval.evaluator import evaluate_matcher
  config, model, variables, mesh = untrained
  results = evaluate_matcher(config, model, variables, mesh, workdir=tmp_path)
  (summary,) = results["test"].values()
  assert list(summary["rows"]) == ["plain", "+TLift", "+RR", "+RR+TLift"]
  for row in summary["rows"].values():
    assert {"R1", "R5", "R10", "mAP", "mINP", "num_queries", "seconds"} <= set(row)
  assert summary["mAP"] == summary["rows"]["plain"]["mAP"] and "notes" not in summary
  saved = np.load(tmp_path / "retrieval.npz")
  (title,) = results["test"]
  for row in summary["rows"]:
    indices, scores = saved[f"{title}/{row}/indices"], saved[f"{title}/{row}/scores"]
    assert indices.shape == scores.shape == (len(saved[f"{title}/query_filenames"]), 5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_evaluate_matcher_without_times_skips_tlift(untrained, monkeypatch):
  """A dataset without times (CUHK03, MSMT17) reports plain and +RR, with a note."""
  import dataclasses

  from jaxreid.data import datasets
  from jaxreid.eval.evaluator import evaluate_matcher
  config, model, variables, mesh = untrained
  load_split = datasets.load_split
  monkeypatch.setattr(datasets, "load_split", lambda *a, **k: dataclasses.replace(
      split := load_split(*a, **k), times=np.full(len(split.pids), np.nan, np.float32)))
  (summary,) = evaluate_matcher(config, model, variables, mesh)["test"].values()
  assert list(summary["rows"]) == ["plain", "+RR"]
  assert "no image times" in summary["notes"][0]


def test_neighbours_of_near_ties_follow_numpy_division():
  """Values one float apart, normalised into [0.5, 1) by a maximum that is not a power of two,
  so the division merges some neighbours into ties: the ranking must be that of x / max as
  NumPy rounds it (XLA's x · (1/max) merges different ones), ties in index order."""
  rng = np.random.default_rng(0)
  n_q, n_g = 40, 260
  base = np.float32(0.45)
  d = base + rng.integers(0, 40, (n_q + n_g, n_q + n_g)).astype(np.float32) * np.spacing(base)
  np.fill_diagonal(d, np.float32(0.7777777))   # every column's maximum
  qg, qq, gg = d[:n_q, n_q:], d[:n_q, :n_q], d[n_q:, n_q:]
  ranks, _ = rerank_module._neighbours(qg, qq, gg, 21)
  full = np.block([[qq, qg], [qg.T, gg]])
  w = (full / full.max(axis=0)).T
  np.testing.assert_array_equal(ranks, np.argsort(w, axis=1, kind="stable")[:, :21])
