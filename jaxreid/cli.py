"""jaxreid command line (`python main.py …` or the installed `jaxreid …`): train, evaluate,
visualize or build datasets from an ml_collections config.

  python main.py --config configs/qaconv_gs.py                  # train on synthetic_reid, evaluate
  python main.py --config configs/qaconv_gs.py --mode=eval      # evaluate the workdir's best checkpoint
  python main.py --config configs/qaconv_gs.py:market --config.dataset.data_dir=/data/tfds
  python main.py --config configs/qaconv_gs.py --mode=visualize  # draw query → top-1 matches
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':setting'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, TensorBoard and results "
                    "(default: workdirs/<config name>).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "build", "visualize"],
                  "train (resumes and then evaluates), eval (restores parameters only), "
                  "build (prepares the configured datasets), or visualize (draws the local "
                  "matches of a few queries with their top-ranked gallery image).")
flags.DEFINE_string("checkpoint", None, "For --mode=eval|visualize: a workdir, checkpoint "
                    "directory or "
                    "official .pth/.safetensors file (default: --workdir).")
flags.DEFINE_integer("num_pairs", 4, "For --mode=visualize: queries drawn (evenly spaced over "
                     "the first test set's query split), each with its top-ranked gallery image.")
flags.DEFINE_integer("num_matches", 24, "For --mode=visualize: strongest matches drawn per pair "
                     "and layer (0 = all).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("compilation_cache", "~/.cache/jaxreid/xla", "Persistent XLA cache "
                    "directory ('' to disable).")


def _config_argument(argv) -> tuple[int, str] | tuple[None, None]:
  """(index in argv, value) of --config, given as '--config X' or '--config=X'."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--config" and i + 1 < len(argv):
      return i + 1, argv[i + 1]
    if arg.startswith("--config="):
      return i, arg.split("=", 1)[1]
  return None, None


def resolve_config_argument(spec: str) -> str:
  """A config given by name ('transmatcher', 'transmatcher:market') or by a path that is not
  here but is one of the shipped configs ('configs/transmatcher.py' outside a checkout) → the
  shipped file's path; any other path is returned unchanged."""
  from jaxreid.api import configs_dir
  path, sep, setting = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path)
  shipped = configs_dir() / (name if name.endswith(".py") else f"{name}.py")
  if shipped.is_file() and shipped.stem not in ("__init__", "common"):
    return f"{shipped}{sep}{setting}"
  return spec


def _fail(message: str) -> None:
  print(f"error: {message.rstrip('.')}.", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing with one clear sentence for a missing config file, an unknown setting, a
  bad --config override or a value of the wrong type."""
  index, spec = _config_argument(argv)
  if spec is not None:
    resolved = resolve_config_argument(spec)
    argv = list(argv)
    argv[index] = resolved if argv[index] == spec else f"--config={resolved}"
    path = resolved.split(":", 1)[0]
    if not os.path.isfile(path):
      from jaxreid.api import method_names
      _fail(f"config file {path} does not exist; give a config file or one of the configs "
            f"shipped with jaxreid by name: {', '.join(method_names())}")
  try:
    return FLAGS(argv)
  except Exception as e:  # ml_collections raises AttributeError/KeyError/TypeError/ValueError
    message = str(e).strip().splitlines()[-1]
    for prefix in ("ValueError: ", "KeyError: ", "AttributeError: ", "TypeError: "):
      message = message.removeprefix(prefix)
    key = message.strip("\"'")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    bad = [a for a in overrides if key in a.split("=")[0].split(".")]
    if bad and isinstance(e, (AttributeError, KeyError)):
      message = (f"{bad[0].split('=')[0]} names a field {key!r} that the config does not have; "
                 "check the field names in the config file")
    _fail(message)


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that files can be written there, before any work is done
  (an evaluation used to run to the end and then fail writing its results)."""
  import tempfile
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a folder; pass a folder.")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be written ({e.strerror}); pass a folder you "
                     "can write to.") from e


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  setting = config_path.split(":")[1] if ":" in config_path else ""
  return os.path.join("workdirs", name + (f"_{setting}" if setting else ""))


def build_datasets(config) -> None:
  """--mode=build: prepares every dataset of dataset.train and dataset.test (array_record under
  dataset.data_dir), real ones from dataset.manual_dir; prints each split's size."""
  from jaxreid.data import datasets
  specs = f"{config.dataset.train},{config.dataset.test}"
  for name, builder_config in dict.fromkeys(datasets.parse_specs(specs)):
    builder = datasets.prepare(name, data_dir=config.dataset.data_dir, config=builder_config,
                               manual_dir=config.dataset.manual_dir,
                               skip_bad_images=config.dataset.skip_bad_images)
    sizes = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
    print(f"{builder.info.full_name}: {sizes} images in {builder.data_path}")


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
  """(name, locations, similarities) of every matching layer of one pair's correspondences, then
  of each finer scale a pyramid matcher adds as `scale{s}_*` (KPM: s = 2, 3, …)."""
  for layer in range(corr["probe_to_gallery"].shape[0]):
    yield (f"layer {layer + 1}", corr["probe_to_gallery"][layer, 0, 0],
           corr["probe_to_gallery_score"][layer, 0, 0])
  s = 2
  while f"scale{s}_probe_to_gallery" in corr:
    yield (f"scale {s}", corr[f"scale{s}_probe_to_gallery"][0, 0],
           corr[f"scale{s}_probe_to_gallery_score"][0, 0])
    s += 1


def _grid(locations: int, map_size) -> tuple[int, int]:
  """The (h, w) grid of `locations` cells: the model's map, or that map upsampled by an
  integer factor (a finer pyramid scale)."""
  h, w = map_size
  factor = int(round((locations / (h * w)) ** 0.5))
  if factor < 1 or factor * factor * h * w != locations:
    raise ValueError(f"{locations} matched locations fit no upsampling of the {h}×{w} map.")
  return h * factor, w * factor


def visualize(config, checkpoint: str, workdir: str, num_pairs: int, num_matches: int) -> dict:
  """--mode=visualize: for `num_pairs` queries of the first test set, ranks the gallery with the
  model (only those queries are scored), and draws the probe → gallery argmax matches of each
  query with its top-ranked valid gallery image (same id and camera excluded, as in evaluation);
  one row per matching layer (TransMatcher: per decoder layer). Writes workdir/visualize/*.png
  and index.json / index.html there; returns the index."""
  import html
  import numpy as np
  import jaxreid
  from jaxreid import viz
  from jaxreid.data import datasets, pipeline
  if num_pairs < 1:
    raise ValueError(f"--num_pairs must be at least 1; got {num_pairs}.")
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
        split, batch_size=model.batch_size, height=h, width=w, indices=indices)]
    return np.concatenate(maps)

  q_maps = encode(query, chosen)
  g_maps = encode(gallery, None)
  scores = model.match(q_maps, g_maps)                                  # [Q, G]
  out_dir = os.path.join(workdir, "visualize")
  os.makedirs(out_dir, exist_ok=True)
  entries = []
  for row, qi in enumerate(chosen):
    valid = ~((gallery.pids == query.pids[qi]) & (gallery.cams == query.cams[qi]))
    if not valid.any():
      continue
    gi = int(np.flatnonzero(valid)[np.argmax(scores[row][valid])])
    corr = model.correspondences(q_maps[row:row + 1], g_maps[gi:gi + 1])   # [L, 1, 1, hw]
    probe_img, gallery_img = _display_image(query, int(qi), (h, w)), _display_image(gallery, gi,
                                                                                     (h, w))
    layers, labels = [], []
    for name, loc, sim in _drawn_rows(corr):
      layers.append(viz.draw_matches(probe_img, gallery_img, loc, sim,
                                     map_size=_grid(loc.size, model.map_size),
                                     top=num_matches or None, gap=8, line_width=2))
      shown = min(num_matches, loc.size) if num_matches else loc.size
      labels.append(f"{name}: strongest {shown} of {loc.size} matches, "
                    f"similarity {sim.max():.3g} (max) {sim.mean():.3g} (mean)")
    correct = bool(gallery.pids[gi] == query.pids[qi])
    heading = (f"query {query.filenames[qi]} -> gallery {gallery.filenames[gi]} "
               f"(score {scores[row, gi]:.3g}, {'same id' if correct else 'different id'})")
    path = os.path.join(out_dir, f"pair{row:02d}_q{int(qi)}_g{gi}.png")
    viz.stack_rows(layers, labels, title=heading).save(path)
    entries.append({"png": path, "query_index": int(qi), "query": query.filenames[qi],
                    "gallery_index": gi, "gallery": gallery.filenames[gi],
                    "score": float(scores[row, gi]), "same_id": correct})
  index = {"test_set": title, "checkpoint": str(checkpoint), "method": model.config.model.name,
           "pairs": entries}
  with open(os.path.join(out_dir, "index.json"), "w") as f:
    json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, "index.html"), "w") as f:
    f.write(f"<html><body><h3>{html.escape(title)}: {html.escape(str(checkpoint))}</h3>\n")
    for e in entries:
      f.write(f"<p>{html.escape(e['query'])} &rarr; {html.escape(e['gallery'])}<br>"
              f"<img src=\"{html.escape(os.path.basename(e['png']))}\"></p>\n")
    f.write("</body></html>\n")
  return index


def main(argv):
  del argv
  import jax
  from jaxreid import parallel
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
  parallel.maybe_initialize_distributed(FLAGS.distributed)
  logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax) off; progress via tqdm
  config = FLAGS.config
  workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
  print(f"devices: {jax.devices()}; workdir: {workdir}", file=sys.stderr)
  if FLAGS.mode == "build":
    build_datasets(config)
    return
  prepare_workdir(workdir)
  if FLAGS.mode == "visualize":
    index = visualize(config, FLAGS.checkpoint or workdir, workdir, FLAGS.num_pairs,
                      FLAGS.num_matches)
    for entry in index["pairs"]:
      print(entry["png"])
    print(os.path.join(workdir, "visualize", "index.html"))
    return
  from jaxreid import registry
  method = registry.method_of(config)
  if FLAGS.mode == "train":
    results = method.train_and_evaluate(config, workdir)
  elif method.evaluate is not None:      # a method with its own evaluation (NFormer's stages)
    results = method.evaluate(config, FLAGS.checkpoint or workdir, workdir)
  else:
    from jaxreid.api import evaluate_checkpoint
    results = evaluate_checkpoint(config, FLAGS.checkpoint or workdir, workdir)
  print(json.dumps(results.get("test", results), indent=2))


def run():
  flags.mark_flag_as_required("config")
  try:
    app.run(main, flags_parser=parse_flags)
  except (ValueError, FileNotFoundError, KeyError) as e:  # one clear sentence, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
