"""train.lr_epoch_offset = 1: the per-epoch lr of reid-strong-baseline's WarmupMultiStepLR as
its trainer drives it (docs/methods/embedding.md), on epochs of different lengths."""
from bisect import bisect_right

import ml_collections
import numpy as np
import pytest
import torch

from configs import embedding
from jaxreid.train.optim import lr_schedule


class WarmupMultiStepLR(torch.optim.lr_scheduler._LRScheduler):
  """solver/lr_scheduler.py of reid-strong-baseline, transcribed."""

  def __init__(self, optimizer, milestones, gamma=0.1, warmup_factor=1.0 / 3, warmup_iters=500,
               warmup_method="linear", last_epoch=-1):
    self.milestones, self.gamma = milestones, gamma
    self.warmup_factor, self.warmup_iters = warmup_factor, warmup_iters
    self.warmup_method = warmup_method
    super().__init__(optimizer, last_epoch)

  def get_lr(self):
    warmup_factor = 1
    if self.last_epoch < self.warmup_iters:
      if self.warmup_method == "constant":
        warmup_factor = self.warmup_factor
      elif self.warmup_method == "linear":
        alpha = self.last_epoch / self.warmup_iters
        warmup_factor = self.warmup_factor * (1 - alpha) + alpha
    return [base_lr * warmup_factor * self.gamma ** bisect_right(self.milestones, self.last_epoch)
            for base_lr in self.base_lrs]


def official_epoch_lrs(lr, epochs, steps, gamma, warmup_factor, warmup_iters):
  """engine/trainer.py: the scheduler built once, then scheduler.step() at EPOCH_STARTED."""
  opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
  scheduler = WarmupMultiStepLR(opt, list(steps), gamma, warmup_factor, warmup_iters, "linear")
  out = []
  for _ in range(epochs):
    scheduler.step()   # before any optimizer.step(), as the official trainer
    out.append(opt.param_groups[0]["lr"])
  return out


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_paper_setting_lr_of_every_epoch_equals_the_official_trainer():
  config = embedding.get_config("market").train
  expected = official_epoch_lrs(config.lr, config.epochs, config.lr_step_epochs,
                                config.lr_step_factor, config.warmup_factor, config.warmup_epochs)
  lengths = np.random.default_rng(0).integers(1, 6, config.epochs)   # epochs of unequal length
  schedule = lr_schedule(config, lengths)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  for e in range(config.epochs):
    for step in (starts[e], starts[e] + lengths[e] - 1):
      np.testing.assert_allclose(float(schedule(step)), expected[e], rtol=1e-5)
  assert expected[0] > 0.01 * config.lr and expected[39] < expected[38]   # the offset matters


def test_offset_zero_keeps_the_previous_schedule():
  c = ml_collections.ConfigDict(dict(lr=1.0, lr_step_epochs=(3,), lr_step_factor=0.1,
                                     warmup_epochs=2, warmup_factor=0.01))
  schedule = lr_schedule(c, 4)
  got = [float(schedule(4 * e)) for e in range(5)]
  np.testing.assert_allclose(got, [0.01, 0.505, 1.0, 0.1, 0.1], rtol=1e-6)
  # lengths given per epoch, beyond the last one: later epochs of the last length
  schedule = lr_schedule(c, [4, 4])
  np.testing.assert_allclose([float(schedule(4 * e)) for e in range(5)], got, rtol=1e-6)
