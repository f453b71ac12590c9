"""Streaming evaluation (gallery encoded and scored chunk by chunk) against the in-memory path:
the same scores, the same metrics, and no gallery-sized feature array while streaming."""
import tracemalloc

import jax
import numpy as np
import pytest

from jaxreid.data import datasets
from jaxreid.eval import evaluator
from jaxreid.eval.scoring import ChunkScorer, match_fn, score_matrix

CHUNK = 48        # 3 eval batches of 16; the synthetic gallery (747) ends in a partial chunk


@pytest.fixture(scope="module")
def setup(synthetic_data_dir):
  """A tiny untrained QAConv-GS (neck 512, so a gallery of maps outweighs everything else the
  streaming path holds) testing on synthetic_reid/domain_b, with its query and gallery."""
  from configs import qaconv_gs
  from jaxreid import parallel
  from jaxreid.models import init_variables
  from jaxreid.registry import build_model
  from training import tiny
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir)
  config.model.neck = 512
  config.eval.update(batch_size=16, tile_p=16, tile_g=32, gallery_chunk=CHUNK)
  model = build_model(config)
  variables = init_variables(model, jax.random.key(0), config.data.height, config.data.width)
  mesh = parallel.make_mesh()
  load = lambda split: datasets.load_split("synthetic_reid", split, data_dir=synthetic_data_dir,
                                           config="domain_b")
  query, gallery = load("query"), load("gallery")
  q = evaluator.extract(model, variables, query, config, mesh)
  return config, model, variables, mesh, query, gallery, q


def test_chunk_size_rounds_to_batches(setup):
  config = setup[0]
  assert evaluator.gallery_chunk(config, 747) == 48
  assert evaluator.gallery_chunk(config, 20) == 32          # the gallery rounded up to batches
  with config.unlocked():
    config.eval.gallery_chunk = 50
    assert evaluator.gallery_chunk(config, 747) == 64
    del config.eval["gallery_chunk"]                          # an older config: the default
    assert evaluator.gallery_chunk(config, 10**6) == evaluator.GALLERY_CHUNK_BATCHES * 16
    config.eval.gallery_chunk = CHUNK


@pytest.mark.parametrize("on_device_mb", [16384, 0])
def test_streamed_scores_equal_in_memory(setup, on_device_mb):
  """Probes on the device or on host: the [P, G] scores of the whole extracted gallery."""
  config, model, variables, mesh, _, gallery, q = setup
  g = evaluator.extract(model, variables, gallery, config, mesh)
  want = score_matrix(match_fn(model), variables, q, g, tile_p=64, tile_g=256, mesh=mesh)
  with config.unlocked():
    config.eval.probes_on_device_mb = on_device_mb
  try:
    got, kept = evaluator.streamed_scores(model, variables, q, gallery, config, mesh,
                                          keep_gallery=True)
  finally:
    with config.unlocked():
      del config.eval["probes_on_device_mb"]
  assert got.shape == (len(q), len(gallery)) and kept.shape == g.shape
  np.testing.assert_allclose(kept, g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.argsort(-got, 1, kind="stable")[:, :5],
                                np.argsort(-want, 1, kind="stable")[:, :5])


def test_evaluation_streamed_equals_in_memory(setup, tmp_path):
  """evaluate_matcher with every row (plain, TLift, RR with GG in on-disk blocks, RR + TLift):
  streamed and in-memory give the same metrics and the same saved retrieval lists."""
  config, model, variables, mesh = setup[:4]
  runs = {}
  for stream in (True, False):
    with config.unlocked():
      config.eval.update(rerank=True, tlift=True, retrieval_top_k=10, stream=stream,
                         rerank_in_memory_mb=0)
    workdir = tmp_path / str(stream)
    workdir.mkdir()
    try:
      (summary,) = evaluator.evaluate_matcher(config, model, variables, mesh,
                                              workdir=workdir)["test"].values()
    finally:
      with config.unlocked():
        config.eval.update(rerank=False, tlift=False, retrieval_top_k=100)
        del config.eval["stream"], config.eval["rerank_in_memory_mb"]
    runs[stream] = summary, np.load(workdir / "retrieval.npz")
    assert not list(workdir.glob("rerank_gg_*"))               # the GG blocks are gone
  (streamed, saved_s), (in_memory, saved_m) = runs[True], runs[False]
  drop = lambda rows: {k: {m: v for m, v in r.items() if m != "seconds"} for k, r in rows.items()}
  assert list(streamed["rows"]) == ["plain", "+TLift", "+RR", "+RR+TLift"]
  assert drop(streamed["rows"]) == drop(in_memory["rows"])
  for key in saved_m.files:
    if key.endswith("indices"):
      np.testing.assert_array_equal(saved_s[key], saved_m[key])
    elif key.endswith("scores"):
      np.testing.assert_allclose(saved_s[key], saved_m[key], rtol=1e-5, atol=1e-5)


def test_streaming_never_holds_the_gallery(setup, monkeypatch):
  """While streaming: the gallery is never extracted whole, every scored chunk has CHUNK rows,
  no device array of gallery × map exists, and the host's traced peak stays below the gallery's
  maps (which the in-memory path's peak, measured the same way, exceeds)."""
  config, model, variables, mesh, query, gallery, q = setup
  map_shape = q.shape[1:]
  gallery_maps = len(gallery) * q[0].nbytes
  chunks, live_peak = [], [0]
  score = ChunkScorer.score

  def watched(self, maps, valid, progress=None):
    chunks.append((maps.shape, valid))
    live = jax.live_arrays()
    assert not [a.shape for a in live if a.shape[1:] == map_shape and a.shape[0] > 2 * CHUNK
                and a.shape[0] != self.probes.shape[0]]
    live_peak[0] = max(live_peak[0], sum(a.nbytes for a in live))
    return score(self, maps, valid, progress)

  evaluator.streamed_scores(model, variables, q, gallery, config, mesh)   # compiled first
  monkeypatch.setattr(ChunkScorer, "score", watched)
  monkeypatch.setattr(evaluator, "extract", lambda *a, **k: pytest.fail("extract called"))
  tracemalloc.start()
  try:
    scores, kept = evaluator.streamed_scores(model, variables, q, gallery, config, mesh)
    _, streamed_peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  monkeypatch.undo()
  assert kept is None and scores.shape == (len(q), len(gallery))
  assert [c for c, _ in chunks] == [(CHUNK, *map_shape)] * -(-len(gallery) // CHUNK)
  assert sum(v for _, v in chunks) == len(gallery) and all(v == CHUNK for _, v in chunks[:-1])
  params = sum(x.nbytes for x in jax.tree.leaves(variables))
  assert live_peak[0] < 2 * params + q.nbytes + gallery_maps // 2, (live_peak, gallery_maps)

  tracemalloc.start()
  try:
    g = evaluator.extract(model, variables, gallery, config, mesh)
    score_matrix(match_fn(model), variables, q, g, mesh=mesh)
    _, in_memory_peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert in_memory_peak >= gallery_maps + scores.nbytes
  print("MEM", live_peak, params, q.nbytes, gallery_maps, streamed_peak, in_memory_peak)
  assert streamed_peak < scores.nbytes + q.nbytes + gallery_maps // 2, (streamed_peak,
                                                                        gallery_maps)


def test_chunk_scorer_matches_numpy():
  """A dot-product matcher: tiles shifted back inside a chunk, probes padded, leftover rows past
  `valid` ignored, probes on device or host — against NumPy."""
  rng = np.random.default_rng(0)
  probe = rng.standard_normal((37, 3, 5)).astype(np.float32)
  gallery = rng.standard_normal((53, 3, 5)).astype(np.float32)
  dot = lambda scale, p, g: scale * jax.numpy.einsum("pad,gad->pg", p, g)
  want = 2.0 * np.einsum("pad,gad->pg", probe, gallery)
  for on_device in (True, False):
    scorer = ChunkScorer(dot, 2.0, probe, 20, tile_p=16, tile_g=8, probes_on_device=on_device)
    got = np.empty_like(want)
    for g0 in range(0, 53, 20):
      part = gallery[g0:g0 + 20]
      chunk = np.full((20, 3, 5), 1e3, np.float32)
      chunk[:len(part)] = part
      got[:, g0:g0 + len(part)] = scorer.score(chunk, len(part))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="rows"):
    scorer.score(gallery[:7], 7)
