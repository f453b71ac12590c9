"""jaxreid command line: train, evaluate or build datasets from an ml_collections config.

  python main.py --config configs/qaconv_gs.py                  # train on synthetic_reid, evaluate
  python main.py --config configs/qaconv_gs.py --mode=eval      # evaluate the workdir's best checkpoint
  python main.py --config configs/qaconv_gs.py:market --config.dataset.data_dir=/data/tfds
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
flags.DEFINE_enum("mode", "train", ["train", "eval", "build"],
                  "train (resumes and then evaluates), eval (restores parameters only), or "
                  "build (prepares the configured datasets).")
flags.DEFINE_string("checkpoint", None, "For --mode=eval: a workdir, checkpoint directory or "
                    "official .pth/.safetensors file (default: --workdir).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("compilation_cache", "~/.cache/jaxreid/xla", "Persistent XLA cache "
                    "directory ('' to disable).")


def parse_flags(argv):
  """absl flag parsing with one clear sentence for a bad --config override."""
  try:
    return FLAGS(argv)
  except Exception as e:  # ml_collections raises AttributeError/KeyError/TypeError/ValueError
    message = str(e).strip().splitlines()[-1]
    key = message.strip("\"'")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    bad = [a for a in overrides if key in a.split("=")[0].split(".")]
    if bad and isinstance(e, (AttributeError, KeyError)):
      message = f"{bad[0].split('=')[0]} names a field {key!r} that the config does not have"
    print(f"error: {message.rstrip('.')}. Check the field names in the config file.",
          file=sys.stderr)
    sys.exit(2)


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
  if FLAGS.mode == "train":
    from jaxreid.train import train_and_evaluate
    results = train_and_evaluate(config, workdir)
  else:
    from jaxreid.evaluate import evaluate_checkpoint
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
