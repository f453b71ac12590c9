"""The blocked, sort-free metrics path: float32 with ties, memmaps, NaN, top-k, bounded memory."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxreid.eval import evaluate_ranking, metrics, top_k
from test_metrics import random_problem, reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("query_block", [None, 1, 7])
def test_float32_with_ties_matches_brute_force(decimals, query_block):
  scores, qids, gids, qcams, gcams = random_problem(7, num_p=60, num_g=150)
  scores = np.random.default_rng(0).normal(size=scores.shape).astype(np.float32)
  if decimals is not None:
    scores = np.round(scores, decimals)
  scores[:, :4] = -0.0                 # -0.0 and 0.0 tie
  scores[:, 4:8] = 0.0
  got = evaluate_ranking(scores, qids, gids, qcams, gcams, max_rank=30, query_block=query_block)
  cmc, m_ap, m_inp, n = reference(scores.astype(np.float64), qids, gids, qcams, gcams, 30)
  assert got["num_valid_queries"] == n
  np.testing.assert_allclose(got["cmc"], cmc, atol=1e-12)
  assert got["mAP"] == pytest.approx(m_ap, abs=1e-12)
  assert got["mINP"] == pytest.approx(m_inp, abs=1e-12)


def test_all_scores_equal():
  scores = np.zeros((5, 9), np.float32)
  qids, gids = np.arange(5), np.arange(9) % 5
  got = evaluate_ranking(scores, qids, gids, np.zeros(5), np.ones(9), max_rank=9)
  want = reference(scores, qids, gids, np.zeros(5), np.ones(9), 9)
  np.testing.assert_allclose(got["cmc"], want[0])
  assert got["mAP"] == pytest.approx(want[1]) and got["mINP"] == pytest.approx(want[2])


def test_memmap_and_integer_scores(tmp_path):
  scores, qids, gids, qcams, gcams = random_problem(4)
  ints = np.round(10 * scores).astype(np.int16)
  path = tmp_path / "s.npy"
  np.save(path, ints)
  got = evaluate_ranking(np.load(path, mmap_mode="r"), qids, gids, qcams, gcams, query_block=9)
  want = evaluate_ranking(ints.astype(np.float64), qids, gids, qcams, gcams)
  np.testing.assert_array_equal(got["cmc"], want["cmc"])
  assert got["mAP"] == want["mAP"] and got["mINP"] == want["mINP"]


def test_nan_in_any_block_raises():
  scores = np.zeros((20, 6), np.float32)
  scores[17, 2] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    evaluate_ranking(scores, np.zeros(20), np.zeros(6), np.zeros(20), np.ones(6), query_block=4)


@pytest.mark.parametrize("k", [1, 5, 70, 500])
def test_top_k_is_the_stable_ranking(k):
  rng = np.random.default_rng(k)
  scores = np.round(rng.normal(size=(33, 300)), 1).astype(np.float32)
  idx, vals = top_k(scores, k, query_block=8)
  want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_array_equal(vals, np.take_along_axis(scores, want, axis=1))


def test_stable_smallest_resolves_straddling_ties():
  x = np.array([[3, 1, 2, 1, 1, 0, 1] + [5] * 70], np.float32)
  np.testing.assert_array_equal(metrics.stable_smallest(x, 3), [[5, 1, 3]])


def test_peak_memory_stays_below_a_copy_of_the_scores():
  """4,000 × 30,000 float32 (480 MB): evaluation adds less than a quarter of that at peak (an
  argsort of the whole matrix would add 960 MB of int64 indices)."""
  script = textwrap.dedent(f"""
      import json, resource, sys
      sys.path.insert(0, {str(ROOT)!r})
      import numpy as np
      from jaxreid.eval import evaluate_ranking
      rng = np.random.default_rng(0)
      p, g = 4000, 30000
      scores = rng.standard_normal((p, g), dtype=np.float32)
      qids, gids = rng.integers(0, 1000, p), rng.integers(0, 1000, g)
      qcams, gcams = rng.integers(0, 6, p), rng.integers(0, 6, g)
      before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      evaluate_ranking(scores, qids, gids, qcams, gcams)
      after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      print(json.dumps({{"added_mb": (after - before) / 1024, "scores_mb": scores.nbytes / 2**20}}))
  """)
  out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                       text=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  print(result)
  assert result["added_mb"] < result["scores_mb"] / 4, result
