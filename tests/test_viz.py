"""Correspondence and rank-list drawing (jaxreid.viz), ReidModel.correspondences for both
methods, and main.py --mode=visualize."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxreid import viz
from jaxreid.api import ReidModel
from jaxreid.models import init_variables
from jaxreid.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


def _blank(h, w):
  return np.zeros((h, w, 3), np.uint8)


def test_draw_matches_size_and_one_line_where_expected():
  # 2×2 map over 40×20 probe and 80×40 gallery images: probe cell 0 (centre (5, 10)) → gallery
  # cell 3 (centre (30, 60) in the gallery, x + 20 on the canvas).
  locations, scores = np.array([3, 0, 0, 0]), np.array([0.9, -1.0, -1.0, -1.0])
  image = viz.draw_matches(_blank(40, 20), _blank(80, 40), locations, scores, map_size=(2, 2),
                           threshold=0.5)
  assert isinstance(image, Image.Image) and image.size == (60, 80)
  array = np.asarray(image)
  assert array.dtype == np.uint8 and array.shape == (80, 60, 3)
  assert (array[40:, :20] == 255).all()         # below the short probe image: background
  x0, y0, x1, y1 = 5, 10, 50, 60
  for t in np.linspace(0.1, 0.9, 9):                   # along the line: coloured (green, the best)
    x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
    patch = array[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3)
    assert (patch[:, 1] > 200).any() and (patch[:, 2] == 0).all()
  assert (array[60:80, 20:25] == 0).all() and (array[0:5, 50:60] == 0).all()  # off the line
  # nothing drawn in the probe image except near the line from cell 0
  assert (array[30:40, :20] == 0).all() and (array[0:40, 12:20][:8] == 0).all()


def _drawn_pixels(image):
  return int((np.asarray(image).sum(-1) > 0).sum())


def test_threshold_and_top_filter_the_matches():
  rng = np.random.default_rng(0)
  locations, scores = rng.integers(0, 8, 8), np.linspace(0.0, 0.7, 8)
  draw = lambda **kw: viz.draw_matches(_blank(64, 32), _blank(64, 32), locations, scores,
                                       map_size=(4, 2), **kw)
  assert list(viz.select_matches(scores, threshold=0.45)) == [7, 6, 5]
  assert list(viz.select_matches(scores, top=2)) == [7, 6]
  assert list(viz.select_matches(scores, threshold=0.65, top=5)) == [7]
  none, one, three, all_ = (_drawn_pixels(draw(threshold=1.0)), _drawn_pixels(draw(top=1)),
                            _drawn_pixels(draw(threshold=0.45)), _drawn_pixels(draw()))
  assert none == 0 < one < three < all_


def test_stack_rows_labels_and_size():
  rows = [Image.new("RGB", (50, 20), (0, 0, 255)), np.zeros((30, 40, 3), np.uint8)]
  out = viz.stack_rows(rows, ["layer 1", "layer 2"], title="pair")
  assert out.width >= 50 and out.height > 50
  array = np.asarray(out)
  assert (array[..., 2] == 255).sum() >= 50 * 20 and (array.sum(-1) < 60).any()  # text/black
  with pytest.raises(ValueError, match="labels"):
    viz.stack_rows(rows, ["one"])


def test_draw_rank_list_frames_by_identity_and_writes_scores():
  query = np.full((40, 40, 3), 200, np.uint8)
  gallery = [np.full((40, 40, 3), 255, np.uint8)] * 3
  out = np.asarray(viz.draw_rank_list(query, gallery, [2.5, 1.0, -0.5],
                                      same_id=[True, False, None], border=3, gap=5))
  # Tiles of 46 px (40 + 2·3, wider than the captions) from x = 5, then every 46 + 5 px.
  xs = [5]
  for _ in range(3):
    xs.append(xs[-1] + 46 + 5)
  assert out.shape[1] == xs[-1] + 46 + 5 and out.shape[0] > 46
  for x, colour in zip(xs, [viz.QUERY, viz.SAME_ID, viz.OTHER_ID, viz.UNKNOWN_ID]):
    assert tuple(out[1, x + 10]) == colour and tuple(out[20, x + 1]) == colour   # the frame
    assert tuple(out[20, x + 10]) in ((200,) * 3, (255,) * 3)                    # the image
    assert (out[47:, x:x + 46] < 100).any()                         # a caption under the tile
  blank = np.asarray(viz.draw_rank_list(query, gallery, [2.5, 1.0, -0.5], border=3, gap=5))
  assert all(tuple(blank[1, x + 10]) == viz.UNKNOWN_ID for x in xs[1:])   # identities unknown
  with pytest.raises(ValueError, match="3 gallery images, 2 scores"):
    viz.draw_rank_list(query, gallery, [1.0, 0.0])


def test_ranked_valid_drops_same_id_same_camera_and_sorts_stably():
  from jaxreid.tools import ranked_valid
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, 30).astype(np.float32)      # many ties
  ids, cams = rng.integers(0, 3, 30), rng.integers(0, 2, 30)
  for qid, qcam in ((0, 0), (1, 1), (7, 0)):
    keep = [g for g in range(30) if not (ids[g] == qid and cams[g] == qcam)]
    expected = sorted(keep, key=lambda g: (-scores[g], g))[:8]
    assert list(ranked_valid(scores, ids, cams, qid, qcam, 8)) == expected


def _tiny_model(name):
  if name == "qaconv":
    from configs import qaconv_gs as module
  else:
    from configs import transmatcher as module
  config = module.get_config()
  config.model.update(depth=18, width=8, neck=16)
  if name == "transmatcher":
    config.model.update(ffn=32)
  module = build_model(config)
  variables = init_variables(module, jax.random.key(0), config.data.height, config.data.width)
  return config, jax.tree_util.tree_map(np.asarray, variables)


def test_api_correspondences_qaconv_is_the_brute_force_argmax():
  config, variables = _tiny_model("qaconv")
  model = ReidModel(config, variables)
  h, w = model.map_size
  rng = np.random.default_rng(1)
  probe, gallery = rng.normal(size=(2, h, w, 16)), rng.normal(size=(3, h, w, 16))
  out = model.correspondences(probe.astype(np.float32), gallery.astype(np.float32))
  s = np.einsum("ptd,grd->pgtr", probe.reshape(2, h * w, 16), gallery.reshape(3, h * w, 16))
  assert out["probe_to_gallery"].shape == (1, 2, 3, h * w)
  np.testing.assert_array_equal(out["probe_to_gallery"][0], s.argmax(3))
  np.testing.assert_array_equal(out["gallery_to_probe"][0], s.argmax(2))
  np.testing.assert_allclose(out["probe_to_gallery_score"][0], s.max(3), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["gallery_to_probe_score"][0], s.max(2), rtol=1e-4, atol=1e-4)


def test_api_correspondences_transmatcher_per_decoder_layer():
  config, variables = _tiny_model("transmatcher")
  rng = np.random.default_rng(2)
  params = variables["params"]["matcher"]
  n, hw = params["prior"].shape[:2]
  # A strong, asymmetric prior so the orientation (probe location × gallery location) matters.
  params["prior"] = rng.normal(scale=3.0, size=params["prior"].shape).astype(np.float32)
  params["fc1_bias"] = rng.normal(scale=0.1, size=params["fc1_bias"].shape).astype(np.float32)
  model = ReidModel(config, variables)
  h, w = model.map_size
  d = params["fc1_kernel"].shape[-1]
  probe = rng.normal(size=(2, n, h, w, d)).astype(np.float32)
  gallery = rng.normal(size=(3, n, h, w, d)).astype(np.float32)
  out = model.correspondences(probe, gallery)
  assert out["probe_to_gallery"].shape == (n, 2, 3, hw)
  k, b = np.asarray(params["fc1_kernel"], np.float64), np.asarray(params["fc1_bias"], np.float64)
  weight = 1 / (1 + np.exp(-np.asarray(params["prior"], np.float64)))   # sigmoid(R_n) [n, t, r]
  for layer in range(n):
    q = probe[:, layer].reshape(2, hw, d) @ k[layer] + b[layer]
    g = gallery[:, layer].reshape(3, hw, d) @ k[layer] + b[layer]
    s = np.einsum("ptd,grd->pgtr", q, g) * weight[layer]
    np.testing.assert_array_equal(out["probe_to_gallery"][layer], s.argmax(3))
    np.testing.assert_array_equal(out["gallery_to_probe"][layer], s.argmax(2))
    np.testing.assert_allclose(out["probe_to_gallery_score"][layer], s.max(3), rtol=1e-3,
                               atol=1e-3)
    np.testing.assert_allclose(out["gallery_to_probe_score"][layer], s.max(2), rtol=1e-3,
                               atol=1e-3)
  # The scores are the values the decoder max-pools (same S_n as TransMatcher.__call__).
  from jaxreid.methods.transmatcher.model import projected_similarities
  project = lambda x: np.einsum("bntd,nde->bnte", x.reshape(x.shape[0], n, hw, d), k) + b[:, None]
  pooled = np.asarray(projected_similarities(project(probe), project(gallery), weight))
  np.testing.assert_allclose(pooled[:, :, :, 0].transpose(2, 0, 1, 3),
                             out["probe_to_gallery_score"], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(pooled[:, :, :, 1].transpose(2, 0, 1, 3),
                             out["gallery_to_probe_score"], rtol=1e-3, atol=1e-3)


def test_main_visualize_writes_pngs(synthetic_data_dir, tmp_path):
  from configs import qaconv_gs
  from jaxreid.checkpoint import Checkpointer
  config = qaconv_gs.get_config()
  config.model.update(depth=18, width=8, neck=16)
  model = build_model(config)
  v = init_variables(model, jax.random.key(0), 64, 32)

  class State:  # what Checkpointer.save_best reads
    step, params, batch_stats = np.int32(1), v["params"], v["batch_stats"]
  ckpt_dir = tmp_path / "ckpt"
  ckpt = Checkpointer(ckpt_dir)
  ckpt.save_best(State, config, {"mAP": 0.5})
  ckpt.wait()
  workdir = tmp_path / "work"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "main.py", "--config", "configs/qaconv_gs.py",
                        "--mode=visualize", f"--checkpoint={ckpt_dir}", f"--workdir={workdir}",
                        f"--config.dataset.data_dir={synthetic_data_dir}", "--num_pairs=2",
                        "--num_matches=5", "--top_k=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  pngs = sorted((workdir / "visualize").glob("*.png"))
  assert len(pngs) == 2
  printed = out.stdout.strip().splitlines()
  assert [Path(p).resolve() for p in printed[:2]] == [p.resolve() for p in pngs]
  index = json.loads((workdir / "visualize" / "index.json").read_text())
  assert len(index["pairs"]) == 2 and index["method"] == "qaconv"
  # index.json's paths are relative to its own folder.
  for entry in index["pairs"] + index["rank_lists"]:
    assert not os.path.isabs(entry["png"]) and (workdir / "visualize" / entry["png"]).is_file()
  assert (workdir / "visualize" / index["checkpoint"]).resolve() == ckpt_dir.resolve()
  for p in index["pairs"]:
    assert p["png"] == Path(p["png"]).name
    # one row per matching layer, then the colour legend
    assert Image.open(workdir / "visualize" / p["png"]).height > 256
  assert (workdir / "visualize" / "index.html").is_file()
  image = Image.open(pngs[0])
  assert image.mode == "RGB" and image.height >= 256 and image.width >= 2 * 128
  # Rank lists: plain and re-ranked top 3 of each drawn query, same id and camera left out.
  from jaxreid.data import datasets
  query = datasets.load_split("synthetic_reid", "query", data_dir=synthetic_data_dir,
                              config="domain_b")
  gallery = datasets.load_split("synthetic_reid", "gallery", data_dir=synthetic_data_dir,
                                config="domain_b")
  ranks = index["rank_lists"]
  assert [r["query_index"] for r in ranks] == [p["query_index"] for p in index["pairs"]]
  assert [Path(p).resolve() for p in printed[2:4]] == [
      (workdir / "visualize" / r["png"]).resolve() for r in ranks]
  html = (workdir / "visualize" / "index.html").read_text()
  for r in ranks:
    q = r["query_index"]
    assert f'href="ranks/{Path(r["png"]).name}"' in html
    for name in ("plain", "reranked"):
      ranked = r[name]
      assert len(ranked) == 3
      for e in ranked:
        g = e["gallery_index"]
        assert not (gallery.pids[g] == query.pids[q] and gallery.cams[g] == query.cams[q])
        assert e["same_id"] == bool(gallery.pids[g] == query.pids[q])
      values = [e["score" if name == "plain" else "distance"] for e in ranked]
      assert values == sorted(values, reverse=name == "plain")   # logits down, distances up
    top = next(p for p in index["pairs"] if p["query_index"] == q)
    assert r["plain"][0]["gallery_index"] == top["gallery_index"]
    assert r["plain"][0]["score"] == pytest.approx(top["score"])
    picture = Image.open(workdir / "visualize" / r["png"])
    assert picture.height > 2 * 128 and picture.width > 4 * 64


def test_visualize_rows_are_labelled_by_layer_or_scale():
  """--mode=visualize draws each matching layer ("layer l"; one map: "matches"), or a pyramid
  matcher's scales (`scale{s}_*`, KPM: "scale 1" is the standard keys' map, then the finer
  ones) each on its own grid, the model's map upsampled by an integer factor."""
  from jaxreid.tools import _drawn_rows, _grid
  rng = np.random.default_rng(0)
  layers = {"probe_to_gallery": rng.integers(0, 8, (2, 1, 1, 8)),
            "probe_to_gallery_score": rng.random((2, 1, 1, 8))}
  assert [name for name, _, _ in _drawn_rows(layers)] == ["layer 1", "layer 2"]
  one = {k: v[:1] for k, v in layers.items()}
  assert [name for name, _, _ in _drawn_rows(one)] == ["matches"]
  pyramid = {"scale1_probe_to_gallery": rng.integers(0, 8, (1, 1, 8)),
             "scale1_probe_to_gallery_score": rng.random((1, 1, 8)),
             "scale2_probe_to_gallery": rng.integers(0, 32, (1, 1, 32)),
             "scale2_probe_to_gallery_score": rng.random((1, 1, 32))}
  pyramid["probe_to_gallery"] = pyramid["scale1_probe_to_gallery"][None]
  pyramid["probe_to_gallery_score"] = pyramid["scale1_probe_to_gallery_score"][None]
  rows = list(_drawn_rows(pyramid))
  assert [name for name, _, _ in rows] == ["scale 1", "scale 2"]
  np.testing.assert_array_equal(rows[1][1], pyramid["scale2_probe_to_gallery"][0, 0])
  assert [_grid(loc.size, (4, 2)) for _, loc, _ in rows] == [(4, 2), (8, 4)]
  with pytest.raises(ValueError, match="24 matched locations fit no upsampling"):
    _grid(24, (4, 2))


def test_kpm_rows_start_at_scale_1():
  """KPM's correspondences give its rows "scale 1", "scale 2", … (never "layer 1")."""
  from jaxreid.methods.kpm import correspondences
  from jaxreid.tools import _drawn_rows
  rng = np.random.default_rng(1)
  probe, gallery = rng.normal(size=(1, 4, 2, 8)), rng.normal(size=(1, 4, 2, 8))
  names = [name for name, _, _ in _drawn_rows(correspondences({"params": {"matcher": {}}},
                                                               probe, gallery))]
  assert names == ["scale 1"]


@pytest.mark.parametrize("map_size", [(2, 1), (4, 2)])
def test_match_ends_in_one_cell_stay_apart(map_size):
  """On small maps many probe cells match one gallery cell: every drawn line keeps its own end,
  spread around the cell's centre, at least 3 pixels from the others."""
  h, w = map_size
  locations, scores = np.zeros(h * w, np.int64), np.linspace(1.0, 2.0, h * w)
  centres = viz.cell_centres(map_size, (128, 64))
  chosen = viz.select_matches(scores)
  ends = viz.spread_endpoints(centres, locations, chosen, (128 / h, 64 / w))
  gaps = np.linalg.norm(ends[:, None] - ends[None], axis=-1) + 1e9 * np.eye(h * w)
  assert gaps.min() >= 3
  assert np.linalg.norm(ends - centres[0], axis=1).max() <= min(128 / h, 64 / w) / 4 + 1e-9
  alone = viz.spread_endpoints(centres, np.arange(h * w), chosen, (128 / h, 64 / w))
  np.testing.assert_allclose(alone, centres)        # one match per cell: the centre itself
  # Drawn: the gallery half holds one dot per match (distinct colours, red → green).
  image = np.asarray(viz.draw_matches(_blank(128, 64), _blank(128, 64), locations, scores,
                                      map_size=map_size, line_width=1))
  for (x, y), i in zip(ends, range(h * w)):
    colour = viz.score_colour(i / (h * w - 1))
    assert (image[int(round(y)), int(round(x)) + 64] == colour).all(), (i, x, y)


def test_colour_legend_runs_red_to_green_with_its_words():
  legend = np.asarray(viz.colour_legend(200, 10))
  assert legend.shape[1] >= 200
  assert tuple(legend[5, 0]) == viz.score_colour(0.0) == (255, 0, 0)
  assert tuple(legend[5, 199]) == viz.score_colour(1.0) == (0, 255, 0)
  assert (legend[12:, :40] < 128).any() and (legend[12:, -40:] < 128).any()   # the two words
