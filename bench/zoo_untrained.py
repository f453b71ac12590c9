"""The untrained model of a config, evaluated as its training run evaluates the trained one
(bench/zoo.py's "untrained" column): the variables the training starts from at config.seed
(`loop.create_train_state`, the training split filling the classifier width), the config's test
sets and eval settings; results.json in --workdir. NFormer: the untrained stage-1 model, without
refinement (there is no stage-2 head yet).

  python bench/zoo_untrained.py --config configs/qaconv_gs.py --workdir W [--config.FIELD=VALUE …]
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':setting'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for results.json and retrieval.npz.")
flags.DEFINE_string("compilation_cache", "~/.cache/jaxreid/xla", "Persistent XLA cache "
                    "directory ('' to disable), as main.py's flag.")


def evaluate_untrained(config, workdir: str) -> dict:
  """Results of `config`'s initial model on its test sets, written to workdir/results.json."""
  import jax
  import optax
  from jaxreid import parallel, registry
  from jaxreid.data import datasets
  from jaxreid.eval.evaluator import evaluate_matcher, write_results
  from jaxreid.train import loop
  datasets.resolve(config)
  split = datasets.load_train(config.dataset.train, data_dir=config.dataset.data_dir,
                              manual_dir=config.dataset.manual_dir)
  loop.fill_from_train_split(config, split)
  image_method = registry.get(config.model.name)   # NFormer: its stage-1 image model
  model = image_method.build(config)
  objective = image_method.objectives[config.train.loss]
  state = loop.create_train_state(config, model, optax.identity(), objective, split.num_classes,
                                  len(split.labels), jax.random.key(config.seed))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  os.makedirs(workdir, exist_ok=True)
  results = evaluate_matcher(config, model, variables, parallel.make_mesh(), workdir=workdir)
  results["step"] = 0
  write_results(workdir, results)
  return results


def main(argv):
  del argv
  import jax
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
  print(f"devices: {jax.devices()}; workdir: {FLAGS.workdir}", file=sys.stderr)
  results = evaluate_untrained(FLAGS.config, FLAGS.workdir)
  from jaxreid import report
  print(report.results_table(results))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
