"""The learning rate of each parameter group in TensorBoard (train/lr/<group>): computed on the
host from the schedule, it equals the lr the optimiser really applied at that step (read off the
parameter updates of a loss whose gradient is 1), and an independent NumPy transcription of
the warmup + multi-step schedule."""
import logging
import struct
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxreid import parallel
from jaxreid.train import loop
from jaxreid.train.optim import learning_rates, make_optimizer
from jaxreid.train.state import TrainState

STEPS_PER_EPOCH, EPOCHS = 2, 4


def train_config(**overrides):
  return ml_collections.ConfigDict(dict(
      lr=0.1, lr_step_epochs=(3,), lr_step_factor=0.1, warmup_epochs=2, warmup_factor=0.01,
      backbone_lr_mult=0.5, optimizer="sgd", momentum=0.0, nesterov=False, clip_norm=0.0,
      weight_decay=0.0, **overrides))


def numpy_lr(step: int, t) -> float:
  """reid-strong-baseline's WarmupMultiStepLR at the epoch of `step`, written out."""
  epoch = step // STEPS_PER_EPOCH
  warm = t.warmup_factor * (1 - epoch / t.warmup_epochs) + epoch / t.warmup_epochs \
      if epoch < t.warmup_epochs else 1.0
  return t.lr * warm * t.lr_step_factor ** sum(epoch >= m for m in t.lr_step_epochs)


def scalars(directory) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of every scalar in the TFRecord event files under `directory`."""
  from tensorboardX.proto import event_pb2
  out = defaultdict(dict)
  for path in sorted(directory.rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        out[value.tag][event.step] = value.simple_value
  return out


def test_logged_lr_is_the_applied_lr(tmp_path):
  t = train_config()
  params = {"encoder": {"backbone": {"w": jnp.zeros(3)}, "neck": {"w": jnp.zeros(3)}},
            "matcher": {"w": jnp.zeros(3)}}
  tx = make_optimizer(t, STEPS_PER_EPOCH)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                     opt_state=tx.init(params), memory={}, rng=jax.random.key_data(
                         jax.random.key(0)))

  def step(state, batch):      # loss = Σ params: every gradient is 1, so an update is -lr
    grads = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)) + 0 * batch["x"].sum())(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    applied = {"applied_backbone": state.params["encoder"]["backbone"]["w"][0]
               - params["encoder"]["backbone"]["w"][0],
               "applied_new": state.params["matcher"]["w"][0] - params["matcher"]["w"][0]}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {
        "loss": jnp.float32(0), "accuracy": jnp.float32(0), **applied}

  task = loop.Task(
      name="", state=state, step=step, epochs=EPOCHS,
      plan=lambda epoch, state: np.arange(STEPS_PER_EPOCH)[:, None],
      batches=lambda plan, epoch, start: ({"x": np.zeros((1, 1), np.float32)}
                                          for _ in plan[start:]),
      evaluate=None, config=ml_collections.ConfigDict({"train": t.to_dict()}),
      checkpoint_dir=tmp_path, mesh=parallel.make_mesh(jax.devices()[:1]), log_every_steps=1,
      learning_rates=lambda s: learning_rates(t, STEPS_PER_EPOCH, int(s.step) - 1,
                                              s.opt_state))
  writer = loop.summary_writer(tmp_path)
  try:
    loop.run(task, logging.getLogger(__name__), writer)
  finally:
    writer.close()
  logged = scalars(tmp_path / "tensorboard")
  steps = range(1, STEPS_PER_EPOCH * EPOCHS + 1)
  assert sorted(logged["train/lr/new"]) == list(steps)
  for s in steps:
    new, backbone = logged["train/lr/new"][s], logged["train/lr/backbone"][s]
    np.testing.assert_allclose(new, logged["train/applied_new"][s], rtol=1e-5)
    np.testing.assert_allclose(backbone, logged["train/applied_backbone"][s], rtol=1e-5)
    np.testing.assert_allclose(new, numpy_lr(s - 1, t), rtol=1e-6)
    np.testing.assert_allclose(backbone, 0.5 * numpy_lr(s - 1, t), rtol=1e-6)
  # two warmup epochs, one at the full lr, one decayed
  assert len({round(v, 8) for v in logged["train/lr/new"].values()}) == 4


def test_bias_groups_and_the_loss_driven_scale():
  t = train_config(bias_lr_mult=2.0, adaptive_step_factor=0.5)
  params = {"encoder": {"backbone": {"w": jnp.zeros(2)}}, "matcher": {"bias": jnp.zeros(2)}}
  opt_state = make_optimizer(t, STEPS_PER_EPOCH).init(params)
  from jaxreid.train.optim import set_lr_scale
  opt_state = set_lr_scale(opt_state, 0.25)
  rates = learning_rates(t, STEPS_PER_EPOCH, 5, opt_state)
  lr = numpy_lr(5, t) * 0.25
  assert set(rates) == {"backbone", "new", "backbone_bias", "new_bias"}
  np.testing.assert_allclose([rates["backbone"], rates["new"], rates["backbone_bias"],
                              rates["new_bias"]], [0.5 * lr, lr, lr, 2 * lr], rtol=1e-6)


def test_a_run_of_the_command_line_logs_each_groups_lr(synthetic_data_dir, tmp_path):
  """The wiring of train_and_evaluate: a tiny QAConv-GS run stopped after 3 steps has
  train/lr/backbone and train/lr/new at every logged step, as its schedule gives them."""
  import subprocess
  import sys
  from pathlib import Path
  from configs import qaconv_gs
  root = Path(__file__).resolve().parents[1]
  tiny = {"model.depth": 18, "model.width": 8, "model.neck": 32, "data.batch_size": 16,
          "data.num_instances": 4, "data.num_threads": 1, "train.epochs": 2,
          "train.log_every_steps": 1, "train.stop_at_step": 3,
          "dataset.data_dir": synthetic_data_dir}
  out = subprocess.run([sys.executable, "main.py", "--config", "qaconv_gs",
                        f"--workdir={tmp_path}", "--compilation_cache=~/.cache/jaxreid/xla-tests",
                        *(f"--config.{k}={v}" for k, v in tiny.items())],
                       cwd=root, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "training stopped before its evaluation" in out.stdout
  assert str(tmp_path / "tensorboard") in out.stdout
  logged = scalars(tmp_path / "tensorboard")
  t = qaconv_gs.get_config().train
  assert sorted(logged["train/lr/new"]) == [1, 2, 3]
  for step in (1, 2, 3):
    # steps_per_epoch only matters past the first epoch's end: any value ≥ 3 gives these.
    want = learning_rates(t, 1000, step - 1)
    np.testing.assert_allclose(logged["train/lr/new"][step], want["new"], rtol=1e-6)
    np.testing.assert_allclose(logged["train/lr/backbone"][step], want["backbone"], rtol=1e-6)
  assert logged["train/lr/backbone"][1] == pytest.approx(
      t.backbone_lr_mult * logged["train/lr/new"][1], rel=1e-6)
