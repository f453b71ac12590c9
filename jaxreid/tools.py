"""What the non-training modes of the jaxreid command line do, usable from Python: draw a
test set's local matches and rank lists (visualize), extract the features of image files
(extract), rank a gallery of image files for each query image (rank) and export a model for
serving (export_for_serving). The command line (jaxreid.cli) parses the flags and calls these;
describing a config is jaxreid.config_help."""
import json
import os


def _upscaled(image, min_height: int):
  """A uint8 HxWx3 image upscaled (nearest) by the smallest integer factor that makes it at
  least `min_height` pixels high."""
  import numpy as np
  factor = max(1, -(-min_height // image.shape[0]))
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _display_image(split, index: int, size: tuple[int, int], min_height: int = 256):
  """Row `index` of `split` resized (bicubic) to the model's input aspect, upscaled by an integer
  factor to at least `min_height` pixels so the drawn lines are legible."""
  import numpy as np
  from PIL import Image
  from jaxreid.data import pipeline
  h, w = size
  factor = max(1, -(-min_height // h))
  image = Image.fromarray(pipeline.load_image(split, index))
  return np.asarray(image.resize((w * factor, h * factor), Image.BICUBIC))


def _drawn_rows(corr: dict):
  """(name, locations, similarities) of each row to draw from one pair's correspondences: a
  pyramid matcher's scales (`scale{s}_*`, KPM: "scale 1" the final map, then the finer ones),
  else every matching layer ("layer l", TransMatcher's decoder layers), else the one map's
  matches ("matches", QAConv)."""
  if "scale1_probe_to_gallery" in corr:
    s = 1
    while f"scale{s}_probe_to_gallery" in corr:
      yield (f"scale {s}", corr[f"scale{s}_probe_to_gallery"][0, 0],
             corr[f"scale{s}_probe_to_gallery_score"][0, 0])
      s += 1
    return
  layers = corr["probe_to_gallery"].shape[0]
  for layer in range(layers):
    yield ("matches" if layers == 1 else f"layer {layer + 1}",
           corr["probe_to_gallery"][layer, 0, 0], corr["probe_to_gallery_score"][layer, 0, 0])


def _grid(locations: int, map_size) -> tuple[int, int]:
  """The (h, w) grid of `locations` cells: the model's map, or that map upsampled by an
  integer factor (a finer pyramid scale)."""
  h, w = map_size
  factor = int(round((locations / (h * w)) ** 0.5))
  if factor < 1 or factor * factor * h * w != locations:
    raise ValueError(f"{locations} matched locations fit no upsampling of the {h}×{w} map.")
  return h * factor, w * factor


def ranked_valid(scores, gallery_ids, gallery_cams, query_id, query_cam, k: int):
  """Indices of the `k` best gallery entries of one query row, best first (a stable sort, ties in
  gallery order), without the entries of the query's id and camera (as evaluation drops them)."""
  import numpy as np
  valid = np.flatnonzero(~((gallery_ids == query_id) & (gallery_cams == query_cam)))
  return valid[np.argsort(-np.asarray(scores)[valid], kind="stable")[:k]]


def _rank_lists(model, query, gallery, chosen, q_maps, g_maps, scores, out_dir: str, top_k: int,
                rerank: bool, min_height: int = 128) -> list[dict]:
  """Per chosen query: its top_k valid gallery entries, plain (by score) and, with `rerank`,
  k-reciprocal re-ranked (by distance; from the scores among the chosen queries and the whole
  gallery), drawn in one picture (out_dir/ranks/*.png). Returns the index entries."""
  from jaxreid import viz
  rows = {"plain": (scores, "{:.3g}", "plain: score")}
  ev = model.config.eval
  if rerank:
    from jaxreid.eval.evaluator import score_distance
    from jaxreid.eval.rerank import rerank as k_reciprocal
    to_dist = lambda x: score_distance(x, ev.get("distance", "sigmoid"))
    k1, k2, lam = ev.get("rerank_k1", 20), ev.get("rerank_k2", 6), ev.get("rerank_lambda", 0.3)
    dist = k_reciprocal(to_dist(scores), to_dist(model.match(q_maps, q_maps)),
                        to_dist(model.match(g_maps, g_maps)), k1=k1, k2=k2, lambda_value=lam)
    rows["reranked"] = (-dist, "d {:.3f}",
                        f"re-ranked (k-reciprocal, k1={k1}, k2={k2}, lambda={lam}): distance")
  h, w = model.input_size
  os.makedirs(os.path.join(out_dir, "ranks"), exist_ok=True)
  shown = {}
  picture = lambda split, i: _display_image(split, i, (h, w), min_height)
  entries = []
  for row, qi in enumerate(chosen):
    qid, qcam = query.pids[qi], query.cams[qi]
    entry = {"query_index": int(qi), "query": query.filenames[qi]}
    drawn, labels, probe = [], [], picture(query, int(qi))
    for name, (ranking, fmt, label) in rows.items():
      top = ranked_valid(ranking[row], gallery.pids, gallery.cams, qid, qcam, top_k)
      same = [bool(gallery.pids[g] == qid) for g in top]
      values = -ranking[row, top] if name == "reranked" else ranking[row, top]
      images = [shown[g] if g in shown else shown.setdefault(g, picture(gallery, int(g)))
                for g in top]
      drawn.append(viz.draw_rank_list(probe, images, values, same_id=same, score_format=fmt))
      labels.append(f"{label}; {sum(same)} of {len(top)} of the same id")
      key = "distance" if name == "reranked" else "score"
      entry[name] = [{"gallery_index": int(g), "gallery": gallery.filenames[g], key: float(v),
                      "same_id": s} for g, v, s in zip(top, values, same)]
    path = os.path.join(out_dir, "ranks", f"rank{row:02d}_q{int(qi)}.png")
    viz.stack_rows(drawn, labels, title=(
        f"query {query.filenames[qi]} (id {qid}, camera {qcam}): top {top_k}; green = same id, "
        "red = another; same id and camera left out")).save(path)
    entry["png"] = path
    entries.append(entry)
  return entries


def visualize(config, checkpoint: str, workdir: str, num_pairs: int, num_matches: int,
              top_k: int = 10, rerank: bool = True) -> dict:
  """--mode=visualize: for `num_pairs` queries of the first test set, ranks the gallery with the
  model (only those queries are scored), and draws the probe → gallery argmax matches of each
  query with its top-ranked valid gallery image (same id and camera excluded, as in evaluation);
  one row per matching layer (TransMatcher: per decoder layer); a method without local matches
  (an embedding) draws none. Then each query's rank list: its `top_k` valid gallery images,
  plain and re-ranked (`rerank`). Writes workdir/visualize/*.png, ranks/*.png, index.json (its
  paths relative to itself) and index.html there; returns the index (paths as written to).
  Each row of a pair's picture is labelled by its scale or layer, under a colour legend."""
  import html
  import numpy as np
  import jaxreid
  from jaxreid import viz
  from jaxreid.data import datasets, pipeline
  if num_pairs < 1:
    raise ValueError(f"--num_pairs must be at least 1; got {num_pairs}.")
  if top_k < 1:
    raise ValueError(f"--top_k must be at least 1; got {top_k}.")
  model = jaxreid.load(config, checkpoint)
  name, test_config = datasets.parse_specs(config.dataset.test)[0]
  title = name if test_config is None else f"{name}/{test_config}"
  data_dir = config.dataset.data_dir
  query = datasets.load_split(name, "query", data_dir=data_dir, config=test_config)
  gallery = datasets.load_split(name, "gallery", data_dir=data_dir, config=test_config)
  h, w = model.input_size
  chosen = np.unique(np.linspace(0, len(query) - 1, min(num_pairs, len(query))).astype(np.int64))

  def encode(split, indices):
    maps = [model.encode(batch["image"])[:valid] for batch, valid in pipeline.eval_batches(
        split, batch_size=model.batch_size, height=h, width=w, indices=indices,
        resize=model.config.data.get("resize", "bicubic"))]
    return np.concatenate(maps)

  q_maps = encode(query, chosen)
  g_maps = encode(gallery, None)
  scores = model.match(q_maps, g_maps)                                  # [Q, G]
  out_dir = os.path.join(workdir, "visualize")
  os.makedirs(out_dir, exist_ok=True)
  entries = []
  for row, qi in enumerate(chosen if model.method.correspondences is not None else []):
    top = ranked_valid(scores[row], gallery.pids, gallery.cams, query.pids[qi], query.cams[qi], 1)
    if not top.size:
      continue
    gi = int(top[0])
    corr = model.correspondences(q_maps[row:row + 1], g_maps[gi:gi + 1])   # [L, 1, 1, hw]
    probe_img, gallery_img = _display_image(query, int(qi), (h, w)), _display_image(gallery, gi,
                                                                                     (h, w))
    layers, labels = [], []
    for name, loc, sim in _drawn_rows(corr):
      grid = _grid(loc.size, model.map_size)
      layers.append(viz.draw_matches(probe_img, gallery_img, loc, sim, map_size=grid,
                                     top=num_matches or None, gap=8, line_width=2))
      shown = min(num_matches, loc.size) if num_matches else loc.size
      labels.append(f"{name} ({grid[0]}x{grid[1]} map): strongest {shown} of {loc.size} "
                    f"matches, similarity {sim.max():.3g} (max) {sim.mean():.3g} (mean)")
    layers.append(viz.colour_legend(min(layers[0].width, 320)))
    labels.append("line colour: the match's similarity within its row")
    correct = bool(gallery.pids[gi] == query.pids[qi])
    heading = (f"query {query.filenames[qi]} -> gallery {gallery.filenames[gi]} "
               f"(score {scores[row, gi]:.3g}, {'same id' if correct else 'different id'})")
    path = os.path.join(out_dir, f"pair{row:02d}_q{int(qi)}_g{gi}.png")
    viz.stack_rows(layers, labels, title=heading).save(path)
    entries.append({"png": path, "query_index": int(qi), "query": query.filenames[qi],
                    "gallery_index": gi, "gallery": gallery.filenames[gi],
                    "score": float(scores[row, gi]), "same_id": correct})
  ranks = _rank_lists(model, query, gallery, chosen, q_maps, g_maps, scores, out_dir, top_k,
                      rerank)
  index = {"test_set": title, "checkpoint": str(checkpoint), "method": model.config.model.name,
           "pairs": entries, "rank_lists": ranks}
  with open(os.path.join(out_dir, "index.json"), "w") as f:
    json.dump(_relative_paths(index, out_dir), f, indent=2)
  link = lambda path: html.escape(os.path.relpath(path, out_dir))
  with open(os.path.join(out_dir, "index.html"), "w") as f:
    f.write(f"<html><body><h3>{html.escape(title)}: {html.escape(str(checkpoint))}</h3>\n")
    if entries:
      f.write("<h4>Local matches with the top-ranked gallery image</h4>\n")
    for e in entries:
      f.write(f"<p>{html.escape(e['query'])} &rarr; {html.escape(e['gallery'])}<br>"
              f"<img src=\"{link(e['png'])}\"></p>\n")
    f.write(f"<h4>Rank lists (top {top_k})</h4>\n")
    for e in ranks:
      f.write(f"<p><a href=\"{link(e['png'])}\">{html.escape(e['query'])}</a><br>"
              f"<img src=\"{link(e['png'])}\"></p>\n")
    f.write("</body></html>\n")
  return index


def _relative_paths(index: dict, folder: str) -> dict:
  """`index` as index.json stores it: the checkpoint and the pictures' paths relative to
  `folder` (the file's own), so the folder can be moved or opened from anywhere."""
  rel = lambda path: os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
  return {**index, "checkpoint": rel(index["checkpoint"]),
          **{key: [{**e, "png": rel(e["png"])} for e in index[key]]
             for key in ("pairs", "rank_lists")}}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def image_files(spec: str | None, flag: str) -> tuple[list, list[str]]:
  """(paths, names) of the images `flag` gives: a folder (searched recursively, sorted, names
  relative to it), a text file listing image paths (one a line, relative to the file's folder;
  names as listed) or one image file."""
  from pathlib import Path
  what = "give a folder of images or a text file listing image paths, one a line"
  if not spec:
    raise ValueError(f"{flag} is missing; {what}.")
  root = Path(os.path.expanduser(spec))
  if not root.exists():
    raise ValueError(f"{flag} {spec} does not exist; {what}.")
  if root.is_dir():
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not paths:
      raise ValueError(f"{flag} {spec} holds no images ({', '.join(IMAGE_SUFFIXES)} files); "
                       f"{what}.")
    return paths, [p.relative_to(root).as_posix() for p in paths]
  if root.suffix.lower() in IMAGE_SUFFIXES:
    return [root], [root.name]
  try:
    lines = root.read_text().splitlines()
  except (UnicodeDecodeError, OSError) as e:
    raise ValueError(f"{flag} {spec} is neither a folder, an image nor a text file listing image "
                     f"paths; {what}.") from e
  names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
  if not names:
    raise ValueError(f"{flag} {spec} lists no image paths; {what}.")
  paths = [Path(os.path.expanduser(n)) for n in names]
  paths = [p if p.is_absolute() else root.parent / p for p in paths]
  missing = [n for n, p in zip(names, paths) if not p.is_file()]
  if missing:
    raise ValueError(f"{flag} {spec} lists {len(missing)} image(s) that do not exist, the first "
                     f"{missing[0]} (relative paths are read from the list file's folder).")
  return paths, names


def _rgb8(image):
  """uint8 H×W×3 of a Pillow image; 16-bit and 32-bit grey images (mode I;16*, I) are scaled
  from their 0–65535 range instead of clipped (Pillow's convert("RGB") clips them to white)."""
  import numpy as np
  if image.mode.startswith("I"):
    grey = np.asarray(image).astype(np.float64)
    return np.repeat(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)[..., None], 3, -1)
  return np.asarray(image.convert("RGB"))


def load_images(paths, size: tuple[int, int], resize: str = "bicubic"):
  """uint8 [N, h, w, 3] of image files, resized as the evaluation pipeline resizes
  (jaxreid.data.augment.eval_transform); a ValueError names an unreadable file."""
  import numpy as np
  from PIL import Image
  from jaxreid.data.augment import eval_transform
  h, w = size
  out = np.empty((len(paths), h, w, 3), np.uint8)
  for i, path in enumerate(paths):
    try:
      with Image.open(path) as image:
        array = _rgb8(image)
    except Exception as e:  # any decoder failure means the same thing to the user
      raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); remove it or "
                       "replace it with a readable JPEG or PNG.") from e
    out[i] = eval_transform(array, height=h, width=w, resize=resize)
  return out


def encode_files(model, paths):
  """Features of image files, `model.batch_size` images at a time (the last batch padded, so
  one shape is compiled)."""
  import numpy as np
  size = min(model.batch_size, len(paths))
  resize = model.config.data.get("resize", "bicubic")
  out = []
  for start in range(0, len(paths), size):
    images = load_images(paths[start:start + size], model.input_size, resize)
    valid = len(images)
    if valid < size:
      images = np.concatenate([images, np.repeat(images[-1:], size - valid, axis=0)])
    out.append(model.encode(images)[:valid])
  return np.concatenate(out)


def _writable(path: str) -> None:
  """Creates folder `path` and writes a file there, before any work (a folder that exists but
  is read-only used to fail only after the model was loaded)."""
  import tempfile
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ValueError(f"cannot write to {path} ({e.strerror}); pass a folder you can write to.") \
        from e


def extract(config, checkpoint: str, images: str | None, output: str) -> dict:
  """--mode=extract: features (what the model's encode gives: maps or vectors) of the images of
  `images` (a folder or a list file) → `output` .npz with `features` [N, ...] and `names` [N]
  (paths relative to the folder, or as listed). Returns {"path", "shape"}."""
  import numpy as np
  import jaxreid
  paths, names = image_files(images, "--images")
  output = output if output.endswith(".npz") else output + ".npz"
  _writable(os.path.dirname(os.path.abspath(output)))
  model = jaxreid.load(config, checkpoint)
  features = encode_files(model, paths)
  np.savez(output, features=features, names=np.asarray(names))
  return {"path": output, "shape": list(features.shape), "method": model.config.model.name}


def rank(config, checkpoint: str, query: str | None, gallery: str | None, out_dir: str,
         top_k: int = 10, min_height: int = 128, rerank: bool = False) -> dict:
  """--mode=rank: ranks the `gallery` images for each `query` image (folders or list files)
  with the method's whole evaluation scorer (`evaluator.ranking_scores`: NFormer refinement,
  top-k re-scoring, KPM's random walk; with `rerank`, k-reciprocal re-ranking, the score then
  being −distance), as --mode=eval ranks the same images; writes out_dir/rank*.png (identities
  unknown: grey frames), ranking.json, ranking.csv (query, rank, gallery, score) and
  index.html. Returns the index."""
  import csv
  import html
  import jaxreid
  from jaxreid import registry, viz
  from jaxreid.eval.evaluator import ranking_scores
  from jaxreid.eval.metrics import top_k as best
  from jaxreid.train import preflight
  q_paths, q_names = image_files(query, "--query")
  g_paths, g_names = image_files(gallery, "--gallery")
  if top_k < 1:
    raise ValueError(f"--top_k must be at least 1; got {top_k}.")
  preflight.validate_eval(config)
  _writable(out_dir)
  model = jaxreid.load(config, checkpoint)
  method = registry.method_of(config)
  q, g = encode_files(model, q_paths), encode_files(model, g_paths)
  if method.refiner is None:
    scores = model.ranking_scores(q, g, rerank=rerank)
  else:
    scores = ranking_scores(model.config, model.module, model.variables, q, g, rerank=rerank,
                            refine=method.refiner(config, checkpoint))
  indices, values = best(scores, top_k)
  resize = model.config.data.get("resize", "bicubic")
  picture = lambda path: _upscaled(load_images([path], model.input_size, resize)[0], min_height)
  shown = {}
  rankings = []
  for i, (row, vals) in enumerate(zip(indices, values)):
    images = [shown[g] if g in shown else shown.setdefault(g, picture(g_paths[g])) for g in row]
    path = os.path.join(out_dir, f"rank{i:03d}.png")
    viz.stack_rows([viz.draw_rank_list(picture(q_paths[i]), images, vals)],
                   title=f"query {q_names[i]}: top {len(row)} of {len(g_names)}").save(path)
    rankings.append({"query": q_names[i], "png": path, "ranked": [
        {"gallery": g_names[g], "gallery_index": int(g), "score": float(v)}
        for g, v in zip(row, vals)]})
  index = {"checkpoint": str(checkpoint), "method": method.name, "top_k": top_k,
           "reranked": bool(rerank), "rankings": rankings}
  with open(os.path.join(out_dir, "ranking.json"), "w") as f:
    json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, "ranking.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["query", "rank", "gallery", "score"])
    for r in rankings:
      writer.writerows([r["query"], k + 1, g["gallery"], f"{g['score']:.6g}"]
                       for k, g in enumerate(r["ranked"]))
  with open(os.path.join(out_dir, "index.html"), "w") as f:
    f.write(f"<html><body><h3>{html.escape(str(checkpoint))}: top {top_k}</h3>\n")
    for r in rankings:
      png = html.escape(os.path.basename(r["png"]))
      f.write(f"<p><a href=\"{png}\">{html.escape(r['query'])}</a><br><img src=\"{png}\"></p>\n")
    f.write("</body></html>\n")
  return index


def export_for_serving(config, checkpoint: str, out_dir: str) -> dict:
  """--mode=export: `encode` and `match` of the loaded model as serialized StableHLO with its
  variables in `out_dir` (jaxreid.export; load them with jaxreid.export.load_exported)."""
  import jaxreid
  from jaxreid.export import export_model
  _writable(out_dir)
  return export_model(jaxreid.load(config, checkpoint), out_dir)
