"""main.py --mode=extract | rank | export | describe, called in-process where they can be (one
tiny model, few compiled shapes), and their user errors through main.py (exit 2, one line)."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import jaxreid
from jaxreid import cli, config_help, tools, viz
from jaxreid.export import load_exported
from test_export import random_variables

ROOT = Path(__file__).resolve().parents[1]


def _config():
  from configs import qaconv_gs
  config = qaconv_gs.get_config()
  config.model.update(depth=18, width=8, neck=16)
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny qaconv_gs checkpoint (drawn variables) and folders of query and gallery images of
  several sizes and modes (RGB, grey, JPEG), with pixel values in [60, 200]."""
  from jaxreid.checkpoint import Checkpointer
  from jaxreid.models import init_variables
  from jaxreid.registry import build_model
  root = tmp_path_factory.mktemp("modes")
  config = _config()
  module = build_model(config)
  v = random_variables(jax.eval_shape(lambda: init_variables(module, jax.random.key(0), 64, 32)))

  class State:  # what Checkpointer.save_best reads
    step, params, batch_stats = np.int32(1), v["params"], v["batch_stats"]
  ckpt = Checkpointer(root / "ckpt")
  ckpt.save_best(State, config, {"mAP": 0.5})
  ckpt.wait()
  rng = np.random.default_rng(0)
  sizes = {"query": [(64, 32), (100, 40), (30, 20)],
           "gallery": [(64, 32), (80, 30), (64, 32), (120, 50), (64, 40)]}
  for split, shapes in sizes.items():
    for i, (h, w) in enumerate(shapes):
      folder = root / split / ("sub" if i == 2 else "")
      folder.mkdir(parents=True, exist_ok=True)
      blocks = rng.integers(60, 201, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
      image = Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8))[:h, :w])
      if split == "query" and i == 2:
        image.convert("L").save(folder / f"{split}{i}.png")
      elif i == 1:
        image.save(folder / f"{split}{i}.jpg", quality=95)
      else:
        image.save(folder / f"{split}{i}.png")
  return {"root": root, "config": config, "checkpoint": str(root / "ckpt")}


def _reference(model, paths):
  """The model's features of image files, resized here as the evaluation pipeline does."""
  h, w = model.input_size
  images = [np.asarray(Image.open(p).convert("RGB").resize((w, h), Image.BICUBIC)) for p in paths]
  return model.encode(np.stack(images))


def test_extract_a_folder_and_a_list_file(setup, tmp_path):
  root = setup["root"]
  written = tools.extract(setup["config"], setup["checkpoint"], str(root / "query"),
                          str(tmp_path / "q"))
  assert written["path"] == str(tmp_path / "q.npz")
  saved = np.load(written["path"])
  names = list(saved["names"])
  assert names == ["query0.png", "query1.jpg", "sub/query2.png"]
  model = jaxreid.load(setup["config"], setup["checkpoint"])
  expected = _reference(model, [root / "query" / n for n in names])
  assert saved["features"].shape == expected.shape == (3, *model.feature_shape)
  np.testing.assert_allclose(saved["features"], expected, rtol=1e-5, atol=1e-5)
  # A list file: paths relative to its folder (or absolute), comments and blank lines skipped.
  listing = root / "list.txt"
  listing.write_text(f"# mine\nquery/sub/query2.png\n\n{root / 'query' / 'query0.png'}\n"
                     "query/query1.jpg\n")
  listed = np.load(tools.extract(setup["config"], setup["checkpoint"], str(listing),
                                 str(tmp_path / "l.npz"))["path"])
  assert list(listed["names"]) == ["query/sub/query2.png", str(root / "query" / "query0.png"),
                                   "query/query1.jpg"]
  np.testing.assert_allclose(listed["features"], saved["features"][[2, 0, 1]], rtol=1e-5,
                             atol=1e-5)


def test_rank_writes_neutral_rank_lists_csv_and_json(setup, tmp_path):
  root = setup["root"]
  index = tools.rank(setup["config"], setup["checkpoint"], str(root / "query"),
                     str(root / "gallery"), str(tmp_path), top_k=3)
  model = jaxreid.load(setup["config"], setup["checkpoint"])
  q_names = ["query0.png", "query1.jpg", "sub/query2.png"]
  g_names = sorted(p.relative_to(root / "gallery").as_posix()
                   for p in (root / "gallery").rglob("*") if p.is_file())
  assert len(g_names) == 5
  scores = model.match(_reference(model, [root / "query" / n for n in q_names]),
                       _reference(model, [root / "gallery" / n for n in g_names]))
  assert len(np.unique(scores)) == scores.size          # no ties: the order is the model's
  with open(tmp_path / "ranking.csv") as f:
    rows = list(csv.DictReader(f))
  assert json.loads((tmp_path / "ranking.json").read_text()) == index
  assert [r["query"] for r in index["rankings"]] == q_names
  for q, ranking in enumerate(index["rankings"]):
    order = sorted(range(len(g_names)), key=lambda g: (-scores[q, g], g))[:3]
    assert [e["gallery"] for e in ranking["ranked"]] == [g_names[g] for g in order]
    np.testing.assert_allclose([e["score"] for e in ranking["ranked"]], scores[q, order],
                               rtol=1e-5, atol=1e-5)
    mine = [r for r in rows if r["query"] == q_names[q]]
    assert [(int(r["rank"]), r["gallery"]) for r in mine] == [
        (k + 1, g_names[g]) for k, g in enumerate(order)]
    picture = np.asarray(Image.open(ranking["png"]))
    is_colour = lambda c: (picture == np.asarray(c, np.uint8)).all(-1).sum()
    assert is_colour(viz.SAME_ID) == 0 and is_colour(viz.OTHER_ID) == 0
    assert is_colour(viz.UNKNOWN_ID) >= 3 * (136 * 72 - 128 * 64)   # 3 grey frames, 4 px wide
  html = (tmp_path / "index.html").read_text()
  assert all(f'src="{Path(r["png"]).name}"' in html for r in index["rankings"])


def test_export_mode_writes_a_loadable_export(setup, tmp_path):
  meta = tools.export_for_serving(setup["config"], setup["checkpoint"], str(tmp_path / "export"))
  model = jaxreid.load(setup["config"], setup["checkpoint"])
  assert meta["method"] == "qaconv" and tuple(meta["feature_shape"]) == model.feature_shape
  served = load_exported(tmp_path / "export")
  assert served.input_size == model.input_size and served.meta == meta


def test_describe_lists_the_settings_and_each_fields_comment():
  from configs import transmatcher
  path = str(cli.resolve_config_argument("transmatcher").split(":")[0])
  config = transmatcher.get_config("table2")
  config.model.depth = 34                                      # an override shows
  text = config_help.describe(config, f"{path}:table2")
  header, *fields = text.splitlines()
  settings = header.split("settings ", 1)[1].split(" (")[0].split(", ")
  # Exactly the words of the file's own unknown-setting error that get_config accepts.
  with pytest.raises(ValueError) as e:
    transmatcher.get_config("nope")

  def accepted(word):
    try:
      transmatcher.get_config(word)
      return True
    except (ValueError, KeyError):
      return False
  named = re.findall(r"\w+", str(e.value).split("; use", 1)[1])
  assert settings[0] == "synthetic" and set(settings) == {w for w in named if accepted(w)}
  assert "this is table2" in header
  assert "model.depth = 34" in fields
  # Each field with a trailing comment in configs/common.py (and none in transmatcher.py) shows it.
  own = (ROOT / "configs" / "transmatcher.py").read_text()
  resolved = dict(config_help._leaves(config.to_dict()))
  checked = 0
  for line in (ROOT / "configs" / "common.py").read_text().splitlines():
    m = re.match(r"\s*c\.([\w.]+) = ([^#]+?)\s+# (.+)$", line)
    if m and f"c.{m[1]} =" not in own and m[1] in resolved:
      assert f"{m[1]} = {resolved[m[1]]!r}  # {m[3]}" in fields, m[1]
      checked += 1
  assert checked >= 10


def run_main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_describe_from_the_command_line(tmp_path):
  out = run_main("--config", "qaconv_gs:market", "--mode=describe", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "market_v20" in out.stdout.splitlines()[0] and "this is market" in out.stdout
  assert "\nmodel.name = 'qaconv'" in out.stdout and not (tmp_path / "workdirs").exists()


def test_image_inputs_that_are_user_mistakes(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes.txt").write_text("# nothing\n\n")
  (tmp_path / "list.txt").write_text("a.png\n")
  (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
  cases = {None: "--images is missing", "nowhere": "--images nowhere does not exist",
           "empty": "holds no images", "notes.txt": "lists no image paths",
           "list.txt": "lists 1 image(s) that do not exist, the first a.png",
           "blob.bin": "is neither a folder, an image nor a text file"}
  for spec, message in cases.items():
    given = spec if spec in (None, "nowhere") else str(tmp_path / spec)
    with pytest.raises(ValueError, match=re.escape(message)):
      tools.image_files(given, "--images")
  (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match=r"cannot read image .*bad\.jpg"):
    tools.load_images([tmp_path / "bad.jpg"], (64, 32))


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_extract_mistakes_exit_2_with_one_sentence(setup, tmp_path, case):
  images = tmp_path / "images"
  if case != "missing":
    images.mkdir()
  if case == "unreadable":
    Image.new("RGB", (32, 64)).save(images / "fine.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  out = run_main("--config", "configs/qaconv_gs.py", "--mode=extract", f"--images={images}",
                 f"--checkpoint={setup['checkpoint']}", f"--workdir={tmp_path / 'work'}",
                 "--compilation_cache=")
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  expected = {"missing": f"error: --images {images} does not exist; give a folder",
              "empty": f"error: --images {images} holds no images",
              "unreadable": f"error: cannot read image {images / 'broken.png'} ("}[case]
  assert last.startswith(expected), last
  assert not (tmp_path / "work" / "features.npz").exists()
