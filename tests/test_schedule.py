"""QAConv-GS v2.1's adaptive schedule: decisions against a transcription of the official main.py,
the lr reaching the optimiser, and resuming through the one training loop."""
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxreid import parallel
from jaxreid.train import loop
from jaxreid.train.optim import make_optimizer, set_lr_scale
from jaxreid.train.schedule import AdaptiveSchedule, from_config
from jaxreid.train.state import TrainState


def official_schedule(losses, step_factor, max_epochs):
  """Transcription of the epoch loop of the official QAConv main.py (latest release): returns the
  lr multiplier each epoch trained with and the epoch (1-based) after which training stops."""
  base_loss, final_epochs, lr_stepped, lr = None, max_epochs, False, 1.0
  lrs = []
  for epoch in range(0, max_epochs):
    loss = losses[epoch]                       # trainer.train(...) → the epoch's mean loss
    lrs.append(lr)
    if epoch == 1:
      base_loss = loss
    epoch1 = epoch + 1
    if not lr_stepped:
      if step_factor >= 1:  # for fixed schedule
        if epoch1 == step_factor:
          lr_stepped = True
      elif (base_loss is not None) and (loss < base_loss * step_factor):
        lr_stepped = True
        final_epochs = min(max_epochs, epoch1 + epoch1 // 2)
      if lr_stepped:
        lr *= 0.1
    if epoch1 == final_epochs:
      break
  return lrs, epoch1


def train_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      lr=0.1, backbone_lr_mult=1.0, lr_step_epochs=(), lr_step_factor=0.1, momentum=0.9,
      nesterov=True, weight_decay=0.0, clip_norm=0.0, adaptive_step_factor=0.7, epochs=60))
  c.update(kw)
  return c


PARAMS = {"matcher": {"w": jnp.zeros(3)}}
GRADS = {"matcher": {"w": jnp.ones(3)}}


def initial_state(tx):
  params = jax.tree.map(jnp.copy, PARAMS)     # fresh arrays: the training step donates its state
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params), memory={}, rng=jax.random.key(0))


def lr_scale_of(state):
  return float(state.opt_state[-1].hyperparams["step_size"])


def ours_schedule(losses, step_factor, max_epochs):
  """Drives AdaptiveSchedule as the training loop does; the lr read back from the optimiser."""
  cfg = train_cfg(adaptive_step_factor=step_factor, epochs=max_epochs)
  schedule = from_config(cfg)
  state = initial_state(make_optimizer(cfg, steps_per_epoch=1))
  lrs = []
  for epoch in range(max_epochs):
    if epoch >= schedule.final_epochs:
      break
    lrs.append(lr_scale_of(state))
    state = schedule.end_epoch(epoch, losses[epoch], state)
  return lrs, min(max_epochs, schedule.final_epochs)


@pytest.mark.parametrize("losses,factor,max_epochs", [
    (10 * 0.9 ** np.arange(60), 0.7, 60),               # steps after epoch 6, stops after 9
    (np.linspace(5, 4, 60), 0.7, 60),                    # never falls enough: 60 epochs, no step
    (10 * 0.5 ** np.arange(20), 0.7, 20),                # steps after epoch 3, stops after 4
    (10 * 0.97 ** np.arange(20), 0.7, 20),               # the stop capped at max_epochs
    (np.linspace(5, 4, 15), 10, 15),                     # factor ≥ 1: a fixed step after epoch 10
    (np.random.default_rng(0).random(30) + 1, 0.8, 30),
    (np.random.default_rng(1).random(30) + 1, 0.6, 30),
])
def test_adaptive_decisions_equal_official(losses, factor, max_epochs):
  expected_lrs, expected_stop = official_schedule(list(losses), factor, max_epochs)
  lrs, stop = ours_schedule(list(losses), factor, max_epochs)
  np.testing.assert_allclose(lrs, expected_lrs, rtol=1e-6)
  assert stop == expected_stop


def test_lr_scale_reaches_the_update():
  tx = make_optimizer(train_cfg(momentum=0.0), steps_per_epoch=1)
  state = initial_state(tx)
  before, _ = tx.update(GRADS, state.opt_state, PARAMS)
  after, _ = tx.update(GRADS, set_lr_scale(state.opt_state, 0.1), PARAMS)
  np.testing.assert_allclose(before["matcher"]["w"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(after["matcher"]["w"], -0.01, rtol=1e-6)
  with pytest.raises(ValueError, match="lr_step_epochs both"):
    from_config(train_cfg(lr_step_epochs=(10,)))
  with pytest.raises(ValueError, match="no lr scale"):
    set_lr_scale(make_optimizer(train_cfg(adaptive_step_factor=0.0), 1).init(PARAMS), 0.1)


# Two steps per epoch; epoch mean losses 10, 9, 8, 7, 6, …: base 9, and 6 < 0.7·9 after epoch 5,
# so the lr steps there and training stops after epoch 5 + 2 = 7 (of at most 12). Epoch 5's
# second step alone (7.5) would not step: a resume mid-epoch needs the partial loss sum.
STEP_LOSSES = np.repeat(10.0 - np.arange(12), 2) + np.tile([-1.5, 1.5], 12)


def run_task(workdir, stop_at_step=None):
  cfg = train_cfg(epochs=12)
  tx = make_optimizer(cfg, steps_per_epoch=2)
  losses = jnp.asarray(STEP_LOSSES, jnp.float32)

  def step(state, batch):
    updates, opt_state = tx.update(GRADS, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    metrics = {"loss": losses[state.step] + 0 * batch["x"].sum(), "accuracy": jnp.zeros(())}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  schedule = from_config(cfg)
  task = loop.Task(
      name="", state=initial_state(tx), step=step, epochs=cfg.epochs,
      plan=lambda epoch, state: np.arange(2).reshape(2, 1),
      batches=lambda plan, epoch, start: ({"x": np.zeros((1,), np.float32)}
                                          for _ in plan[start:]),
      evaluate=None, config=cfg, checkpoint_dir=workdir, mesh=parallel.make_mesh(jax.devices()[:1]),
      checkpoint_every_steps=1000, stop_at_step=stop_at_step, schedule=schedule)
  _, state = loop.run(task, logging.getLogger("test_schedule"), loop._NullWriter())
  return state, schedule


@pytest.mark.parametrize("stop_at", [9, 10, 11])
def test_interrupted_run_resumes_with_the_same_lr_and_stop(tmp_path, stop_at):
  """Interrupted mid-epoch before the decision (9), at the end of the deciding epoch before the
  decision is made (10), and after it (11)."""
  full, full_schedule = run_task(tmp_path / "full")
  assert int(full.step) == 14 and full_schedule.final_epochs == 7 and lr_scale_of(full) == pytest.approx(0.1)
  first, first_schedule = run_task(tmp_path / "split", stop_at_step=stop_at)
  assert int(first.step) == stop_at
  assert lr_scale_of(first) == pytest.approx(0.1 if stop_at > 10 else 1.0)
  resumed, schedule = run_task(tmp_path / "split")
  assert int(resumed.step) == 14 and schedule.final_epochs == 7
  assert schedule.base_loss == pytest.approx(9.0) and schedule.stepped
  assert lr_scale_of(resumed) == pytest.approx(0.1)
  np.testing.assert_allclose(resumed.params["matcher"]["w"], full.params["matcher"]["w"],
                             rtol=1e-6)


def test_schedule_state_round_trip():
  a = AdaptiveSchedule(0.7, 60)
  b = AdaptiveSchedule(0.7, 60)
  b.load_state_dict(a.state_dict())
  assert b.base_loss is None and not b.stepped and b.final_epochs == 60
  with pytest.raises(ValueError, match="adaptive_step_factor must be positive"):
    AdaptiveSchedule(-1.0, 60)
