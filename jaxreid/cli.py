"""jaxreid command line (`python main.py …` or the installed `jaxreid …`): train, evaluate,
visualize, build datasets, extract features, rank image folders, export for serving or describe
a config, from an ml_collections config. This module parses the flags and dispatches; what the
non-training modes do is in jaxreid.tools (describe: jaxreid.config_help), usable from Python.

  python main.py --config configs/qaconv_gs.py                  # train on synthetic_reid, evaluate
  python main.py --config configs/qaconv_gs.py --mode=eval      # evaluate the workdir's best checkpoint
  python main.py --config configs/qaconv_gs.py:market --config.dataset.data_dir=/data/tfds
  python main.py --config configs/qaconv_gs.py --mode=visualize  # local matches, rank lists
  python main.py --config qaconv_gs --mode=extract --images DIR   # features of your images → .npz
  python main.py --config qaconv_gs --mode=rank --query DIR --gallery DIR  # rank lists, CSV, JSON
  python main.py --config qaconv_gs --mode=export                 # StableHLO encode/match to serve
  python main.py --config transmatcher --mode=describe            # fields, comments and settings
"""
import errno
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxreid import config_help, tools

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':setting'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, TensorBoard and results "
                    "(default: workdirs/<config name>).")
MODES = {
    "train": "trains (resuming the workdir's last checkpoint), then evaluates",
    "eval": "evaluates --checkpoint (default: the workdir's best checkpoint)",
    "build": "prepares the configured datasets",
    "visualize": "draws the local matches of a few queries with their top-ranked gallery "
                 "image, and their rank lists",
    "extract": "writes the features of --images",
    "rank": "ranks --gallery for each --query image",
    "export": "writes encode and match as StableHLO for serving",
    "convert": "turns --checkpoint (an official .pth or any loadable model) into a jaxreid "
               "checkpoint folder --output that loads without torch",
    "describe": "prints the config with its comments and settings",
}
flags.DEFINE_enum("mode", "train", list(MODES), "What to do (--help describes each mode).")
flags.DEFINE_string("checkpoint", None, "For --mode=eval|visualize|extract|rank|export|convert: "
                    "a workdir, checkpoint directory or official .pth/.safetensors file "
                    "(default: --workdir).")
flags.DEFINE_integer("num_pairs", 4, "For --mode=visualize: queries drawn (evenly spaced over "
                     "the first test set's query split), each with its top-ranked gallery image.")
flags.DEFINE_integer("num_matches", 24, "For --mode=visualize: strongest matches drawn per pair "
                     "and layer (0 = all).")
flags.DEFINE_integer("top_k", 10, "For --mode=visualize|rank: gallery images per rank list.")
flags.DEFINE_bool("rerank", True, "For --mode=visualize: also draw the k-reciprocal re-ranked "
                  "lists (eval.rerank_k1/k2/lambda; scores the gallery against itself); for "
                  "--mode=rank, given explicitly: rank by the re-ranked distance (--mode=eval's "
                  "+RR row) instead of the plain scores.")
flags.DEFINE_string("images", None, "For --mode=extract: a folder of images (searched "
                    "recursively) or a text file listing image paths, one a line.")
flags.DEFINE_string("query", None, "For --mode=rank: the query images (a folder or a list "
                    "file, as --images).")
flags.DEFINE_string("gallery", None, "For --mode=rank: the gallery images (a folder or a list "
                    "file, as --images).")
flags.DEFINE_string("output", None, "For --mode=extract: the .npz to write (default "
                    "workdir/features.npz); for --mode=rank|export|convert: the folder to "
                    "write (default workdir/rank, workdir/export, workdir/converted).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("compilation_cache", "~/.cache/jaxreid/xla", "Persistent XLA cache "
                    "directory ('' to disable).")


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")
EXAMPLES = (
    ("jaxreid --config qaconv_gs", "train on the synthetic data set, then evaluate"),
    ("jaxreid --config qaconv --checkpoint qaconv.pth.tar --mode=eval",
     "evaluate the authors' released weights (docs/weights.md)"),
)


def help_text() -> str:
  """`jaxreid --help`: usage, the modes, two examples and every flag of this module with its
  help (absl's own --help lists only the flags of the __main__ module: none)."""
  import textwrap
  from jaxreid.api import config_names
  wrap = lambda text, indent: textwrap.fill(text, 79, initial_indent=indent,
                                            subsequent_indent=" " * len(indent))
  width = max(len(m) for m in MODES)
  lines = ["usage: jaxreid --config CONFIG[:SETTING] [--mode=MODE] [--workdir=DIR]",
           "               [--config.FIELD=VALUE ...] [flags]",
           "       (python main.py takes the same arguments)", "",
           wrap("CONFIG: a config file, or the name of one shipped with jaxreid ("
                + ", ".join(config_names()) + "). --config.FIELD=VALUE overrides a field; "
                "--mode=describe lists the fields.", ""), "", "modes (--mode):"]
  lines += [wrap(what, f"  {m:<{width}}  ") for m, what in MODES.items()]
  lines += ["", "examples:"] + [f"  {command}\n      {what}" for command, what in EXAMPLES]
  lines += ["", "flags:" + FLAGS.module_help(sys.modules[__name__]).split(":", 1)[1]]
  return "\n".join(lines) + "\n"


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
  from jaxreid.api import config_names, configs_dir
  path, sep, setting = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path).removesuffix(".py")
  if name in config_names():
    return f"{configs_dir() / f'{name}.py'}{sep}{setting}"
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
      from jaxreid.api import config_names
      _fail(f"config file {path} does not exist; give a config file or one of the configs "
            f"shipped with jaxreid by name: {', '.join(config_names())}")
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


def main(argv):
  del argv
  if FLAGS.mode == "describe":
    print(config_help.describe(FLAGS.config, FLAGS["config"].config_filename))
    return
  import jax
  from jaxreid import parallel
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
  parallel.maybe_initialize_distributed(FLAGS.distributed)
  logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax) off; progress via tqdm
  # Orbax logs each failed asynchronous write with its tracebacks (hundreds of lines); the
  # checkpointer raises one sentence for it instead.
  logging.get_absl_logger().addFilter(
      lambda r: r.levelno < logging.converter.STANDARD_ERROR or "orbax" not in r.pathname)
  config = FLAGS.config
  workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
  print(f"devices: {jax.devices()}; workdir: {workdir}", file=sys.stderr)
  if FLAGS.mode == "build":
    build_datasets(config)
    return
  prepare_workdir(workdir)
  checkpoint = FLAGS.checkpoint or workdir
  if FLAGS.mode == "visualize":
    index = tools.visualize(config, checkpoint, workdir, FLAGS.num_pairs, FLAGS.num_matches,
                            FLAGS.top_k, FLAGS.rerank)
    for entry in index["pairs"] + index["rank_lists"]:
      print(entry["png"])
    print(os.path.join(workdir, "visualize", "index.html"))
    return
  if FLAGS.mode == "extract":
    written = tools.extract(config, checkpoint, FLAGS.images,
                            FLAGS.output or os.path.join(workdir, "features.npz"))
    print(f"{written['path']}: features {written['shape']} ({written['method']})")
    return
  if FLAGS.mode == "rank":
    out_dir = FLAGS.output or os.path.join(workdir, "rank")
    tools.rank(config, checkpoint, FLAGS.query, FLAGS.gallery, out_dir, FLAGS.top_k,
               rerank=FLAGS["rerank"].present and FLAGS.rerank)
    print(os.path.join(out_dir, "ranking.csv"))
    print(os.path.join(out_dir, "index.html"))
    return
  if FLAGS.mode == "convert":
    convert_checkpoint(config, workdir)
    return
  if FLAGS.mode == "export":
    out_dir = FLAGS.output or os.path.join(workdir, "export")
    meta = tools.export_for_serving(config, checkpoint, out_dir)
    print(f"{out_dir}: {json.dumps(meta)}")
    return
  from jaxreid import registry
  method = registry.method_of(config)
  if FLAGS.mode == "train":
    from jaxreid.train import loop
    loop.STOP_AT_ONCE = _exit_at_once    # a second signal ends the process at once
    results = registry.train_and_evaluate(config, workdir)
  elif method.evaluate is not None:      # a method with its own evaluation (NFormer's stages)
    results = method.evaluate(config, FLAGS.checkpoint or workdir, workdir)
  else:
    from jaxreid.api import evaluate_checkpoint
    results = evaluate_checkpoint(config, FLAGS.checkpoint or workdir, workdir)
  print_summary(results, workdir)


def convert_checkpoint(config, workdir: str) -> None:
  """--mode=convert: --checkpoint (an official file or any loadable model) → a jaxreid
  checkpoint folder --output (default workdir/converted) that loads without torch; an official
  file at its authors' input size unless --config.data.height/width are given."""
  from jaxreid.api import convert
  if not FLAGS.checkpoint:
    raise ValueError("--mode=convert needs --checkpoint: the official .pth/.pth.tar/.safetensors "
                     "file (or a run) to convert.")
  out_dir = FLAGS.output or os.path.join(workdir, "converted")
  # An official file is converted at the size its authors trained at (jaxreid.load's default,
  # e.g. 384×128 for QAConv), not at a synthetic config's 64×32, unless the size is given.
  overrides = config_flags.get_override_values(FLAGS["config"])
  given = any(k in overrides for k in ("data.height", "data.width"))
  written = convert(config, FLAGS.checkpoint, out_dir,
                    input_size=(config.data.height, config.data.width) if given else None)
  print(f"{out_dir}: {written['method']} at {written['input_size'][0]}×"
        f"{written['input_size'][1]}; evaluate it with --mode=eval --checkpoint {out_dir} or "
        f"load it with jaxreid.load('{written['method']}', '{out_dir}')")


def print_summary(results: dict, workdir: str) -> None:
  """The end of a train/eval run: the metrics table per test set and where the files are."""
  from jaxreid import report
  if results.get("test"):
    print(report.results_table(results))
    print()
  else:
    print("no results: training stopped before its evaluation (rerun to resume)")
  print(report.run_files(workdir, results.get("checkpoint")))


def _drop_closed_event_loop_reports() -> None:
  """After a failed asynchronous checkpoint write (a full disk), every TensorStore write still
  pending reports "Event loop is closed" through sys.excepthook / sys.unraisablehook, one
  traceback each; the failure itself is the one sentence the checkpointer raises."""
  def closed_loop(value) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  sys.excepthook = lambda kind, value, tb: None if closed_loop(value) else excepthook(kind, value,
                                                                                      tb)
  sys.unraisablehook = lambda u: None if closed_loop(u.exc_value) else unraisablehook(u)


def _exit(status: int) -> None:
  """Ends the process without the interpreter's shutdown: TensorBoard's atexit flush, its
  writer thread and abandoned checkpoint tasks would each fail again (on a full disk, a closed
  event loop) with a traceback apiece after the sentence that says what happened, or keep a
  stopped run waiting."""
  sys.stdout.flush()
  sys.stderr.flush()
  import logging as std_logging
  std_logging.shutdown()
  os._exit(status)


def _exit_at_once(signum: int, message: str) -> None:
  """`stopped: message` and exit status 128 + signum at once; safe inside a signal handler
  (os.write, no buffered stream a signal may have interrupted)."""
  os.write(2, f"\nstopped: {message}\n".encode())
  os._exit(128 + signum)


def _stop_outside_training(signum, frame) -> None:
  """SIGTERM/SIGINT where no training loop handles it (start-up: config, datasets,
  compilation; the modes other than train): one sentence, the conventional exit status."""
  del frame
  import signal
  name = signal.Signals(signum).name
  mode = FLAGS.mode if FLAGS.is_parsed() else "train"
  _exit_at_once(signum, f"{name} received before training began or after its last checkpoint; "
                "rerun the same command to start or resume the run" if mode == "train" else
                f"{name} received before --mode={mode} finished; rerun the same command")


def run():
  if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
    print(help_text(), end="")
    sys.exit(0)
  import signal
  flags.mark_flag_as_required("config")
  _drop_closed_event_loop_reports()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, _stop_outside_training)
  try:
    app.run(main, flags_parser=parse_flags)
  except (ValueError, OSError, KeyError) as e:  # one clear sentence, no traceback
    print(f"error: {e}", file=sys.stderr)
    if "No space left on device" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
      _exit(2)
    sys.exit(2)
  except KeyboardInterrupt as e:   # the training loop stopped at a signal, its checkpoint saved
    print(f"stopped: {e or 'interrupted'}", file=sys.stderr)
    _exit(128 + getattr(e, "signum", signal.SIGINT))


if __name__ == "__main__":
  run()
