"""A QAConv-GS run interrupted at an epoch end resumes exactly: the graph sampler's per-class
pointers and the schedule's decision come back from the checkpoint."""
import jax
import numpy as np

from configs import qaconv_gs
from jaxreid.checkpoint import Checkpointer, restore_for_eval
from jaxreid.data import datasets
from training import tiny


def test_gs_adaptive_run_resumes_at_an_epoch_end(synthetic_data_dir, tmp_path):
  from jaxreid.registry import train_and_evaluate
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=2, lr_step_epochs=(),
                adaptive_step_factor=1.0)       # factor ≥ 1: the official fixed step, after epoch 1
  config.data.num_instances = 2
  config.train.update(loss="triplet", eval_every_epochs=0)
  steps_per_epoch = datasets.load_train(config.dataset.train,
                                        data_dir=config.dataset.data_dir).num_classes
  full = train_and_evaluate(config, tmp_path / "full")
  interrupted = config.copy_and_resolve_references()
  interrupted.train.stop_at_step = steps_per_epoch   # the last batch of epoch 1, before its end
  assert train_and_evaluate(interrupted, tmp_path / "split") == {}
  resumed = train_and_evaluate(config, tmp_path / "split")
  assert resumed["step"] == full["step"] == 2 * steps_per_epoch
  _, a = restore_for_eval(str(tmp_path / "full" / "checkpoints"))
  _, b = restore_for_eval(str(tmp_path / "split" / "checkpoints"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The saved data state carries the sampler's pointers (moved on by two epochs) and the schedule.
  state = Checkpointer(tmp_path / "split").last
  data = state.restore(state.latest_step())["data"]
  assert np.asarray(data["sampler.pointer"]).shape == (steps_per_epoch,)
  assert np.asarray(data["sampler.pass"]).sum() > 0
  assert bool(data["schedule.stepped"]) and int(data["schedule.final_epochs"]) == 2
