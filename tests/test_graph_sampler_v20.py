"""A QAConv-GS v2.0 run (random-PK pre-epoch, re-ranked graph, neck BN) stopped inside its
pre-epoch resumes exactly, and its lr schedule counts the pre-epoch's own length."""
import jax
import numpy as np

from configs import qaconv_gs
from jaxreid.checkpoint import Checkpointer, restore_for_eval
from jaxreid.data import datasets
from jaxreid.data.samplers import GraphSampler
from jaxreid.train.optim import lr_schedule
from training import tiny


def test_v20_sampler_run_resumes_inside_the_pre_epoch(synthetic_data_dir, tmp_path):
  from jaxreid.registry import train_and_evaluate
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=2, lr_step_epochs=(1,),
                eval_every_epochs=0)
  config.model.neck_bn = True
  config.data.update(gs_pre_epochs=1, gs_rerank=True)
  split = datasets.load_train(config.dataset.train, data_dir=config.dataset.data_dir)
  sampler = GraphSampler(split.labels, batch_size=config.data.batch_size,
                         num_instances=config.data.num_instances, seed=config.seed, pre_epochs=1)
  lengths = sampler.epoch_lengths(2)
  assert lengths[1] == split.num_classes and lengths[0] != lengths[1]   # the test means something
  # The ×0.1 step at epoch 1 falls after the pre-epoch's own number of batches.
  lr = lr_schedule(config.train, lengths)
  assert np.isclose(float(lr(lengths[0] - 1)), config.train.lr)
  assert np.isclose(float(lr(lengths[0])), config.train.lr * config.train.lr_step_factor)
  full = train_and_evaluate(config, tmp_path / "full")
  interrupted = config.copy_and_resolve_references()
  interrupted.train.stop_at_step = lengths[0] // 2        # inside the pre-epoch
  assert train_and_evaluate(interrupted, tmp_path / "split") == {}
  resumed = train_and_evaluate(config, tmp_path / "split")
  assert resumed["step"] == full["step"] == sum(lengths)
  _, a = restore_for_eval(str(tmp_path / "full" / "checkpoints"))
  _, b = restore_for_eval(str(tmp_path / "split" / "checkpoints"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The pointers moved only in the graph epoch: C batches of B/K classes, K images each.
  state = Checkpointer(tmp_path / "split").last
  data = state.restore(state.latest_step())["data"]
  taken = (np.asarray(data["sampler.pass"]) * np.bincount(split.labels)
           + np.asarray(data["sampler.pointer"]))
  assert taken.sum() == split.num_classes * config.data.batch_size
