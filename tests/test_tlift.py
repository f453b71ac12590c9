"""tlift against a per-query loop written from the papers and docs/methods."""
import numpy as np
import pytest

from jaxreid import tlift
from jaxreid.eval import tlift as tlift_module


def reference(scores, g_cams, g_times, q_cams, q_times, tau, sigma, k, alpha):
  out = np.empty(scores.shape)
  for i in range(len(scores)):
    near = np.flatnonzero((q_cams == q_cams[i]) & (np.abs(q_times - q_times[i]) < tau))
    for c in np.unique(g_cams):
      cols = np.flatnonzero(g_cams == c)
      s = scores[np.ix_(near, cols)]
      thr = np.sort(s, axis=None)[::-1][min(k, s.size) - 1]
      pivot_times = np.broadcast_to(g_times[cols], s.shape)[s >= thr]   # with multiplicity
      w = np.exp(-(g_times[cols][:, None] - pivot_times[None, :]) ** 2 / sigma ** 2).mean(1)
      out[i, cols] = (w + alpha) * scores[i, cols]
  return out


def random_problem(rng, p, g, num_cams, span, ties):
  scores = rng.uniform(size=(p, g))
  if ties:
    scores = np.round(scores, 1)
  q_times = rng.uniform(0, span, p)
  q_times[: p // 3] = np.round(q_times[: p // 3])          # some exactly tau apart
  return (scores, rng.integers(0, num_cams, g), rng.uniform(0, span, g),
          rng.integers(0, num_cams, p), q_times)


@pytest.mark.parametrize("p, g, cams, span, k", [
    (1, 5, 2, 100, 10), (40, 90, 3, 600, 10), (60, 50, 4, 300, 3), (30, 200, 2, 5000, 10),
    (25, 12, 5, 200, 30)])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(p, g, cams, span, k, ties):
  rng = np.random.default_rng(p + g + k)
  scores, g_cams, g_times, q_cams, q_times = random_problem(rng, p, g, cams, span, ties)
  got = tlift(scores, g_cams, g_times, q_cams, q_times, tau=100, sigma=200, K=k, alpha=0.2)
  want = reference(scores, g_cams, g_times, q_cams, q_times, 100, 200, k, 0.2)
  assert got.shape == (p, g) and got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_single_image_cameras_and_float32():
  """Cameras holding one query or one gallery image; float32 stays float32."""
  rng = np.random.default_rng(0)
  scores = rng.uniform(size=(6, 7)).astype(np.float32)
  q_cams, g_cams = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 3, 3, 3, 4, 4])
  q_times, g_times = rng.uniform(0, 150, 6), rng.uniform(0, 150, 7)
  got = tlift(scores, g_cams, g_times, q_cams, q_times)
  assert got.dtype == np.float32
  want = reference(scores.astype(np.float64), g_cams, g_times, q_cams, q_times, 100, 200, 10, 0.2)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_small_kernel_chunks(monkeypatch):
  rng = np.random.default_rng(1)
  problem = random_problem(rng, 50, 80, 2, 400, False)
  want = tlift(*problem)
  monkeypatch.setattr(tlift_module, "_KERNEL_ELEMENTS", 10)
  np.testing.assert_allclose(tlift(*problem), want, rtol=1e-12)


def test_co_occurring_pivots_lift_the_true_match():
  """Fig. 4 of the paper: E looks more like A than A' does, but B' and C' (the top matches of
  A's co-walkers B and C) appeared next to A' in the other camera, so A' wins after lifting."""
  #                  A'    E     B'    C'
  scores = np.array([[0.60, 0.70, 0.10, 0.10],    # A
                     [0.10, 0.10, 0.90, 0.10],    # B
                     [0.10, 0.10, 0.10, 0.90]])   # C
  lifted = tlift(scores, [1, 1, 1, 1], [1000.0, 5000.0, 1010.0, 990.0], [0, 0, 0],
                 [0.0, 20.0, 40.0], K=3)
  assert lifted[0, 0] > lifted[0, 1]


def test_missing_times_message():
  with pytest.raises(ValueError, match="cannot use TLift"):
    tlift(np.ones((2, 3)), [0, 1, 1], [1.0, np.nan, 2.0], [0, 1], [0.0, 1.0])
