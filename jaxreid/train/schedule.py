"""Epoch schedules decided by the training loss: QAConv-GS v2.1's adaptive schedule
(docs/methods/qaconv.md).

A schedule is what `Task.schedule` takes: the training loop calls `end_epoch(epoch, mean_loss,
state)` after every epoch (it returns the state with the lr it decided) and stops after epoch
`final_epochs`; `state_dict` / `load_state_dict` carry its decisions through checkpoints. The
lr itself reaches the jitted optimiser as the scale in its state (`optim.set_lr_scale`), so it is
checkpointed with the optimiser state.
"""
import math

import numpy as np

from jaxreid.train import optim

# The base loss is the mean loss of the second epoch (0-based epoch 1), as in the official code.
BASE_EPOCH = 1


def adaptive_decision(epoch: int, loss: float, base_loss: float | None, stepped: bool,
                      final_epochs: int, *, step_factor: float, max_epochs: int):
  """One end-of-epoch decision of QAConv-GS (its main.py): after 0-based `epoch` with mean loss
  `loss`, → (base_loss, stepped, final_epochs, stepped_now).

  The base loss is epoch 2's loss. With step_factor < 1 the lr steps (once) after the first epoch
  e (1-based) whose loss < step_factor × base loss, and training stops after epoch
  min(max_epochs, e + e // 2); with step_factor ≥ 1 it steps after epoch step_factor and runs
  max_epochs.
  """
  if epoch == BASE_EPOCH:
    base_loss = loss
  epoch1 = epoch + 1
  stepped_now = False
  if not stepped:
    if step_factor >= 1:
      stepped_now = epoch1 == step_factor
    elif base_loss is not None and loss < base_loss * step_factor:
      stepped_now = True
      final_epochs = min(max_epochs, epoch1 + epoch1 // 2)
  return base_loss, stepped or stepped_now, final_epochs, stepped_now


class AdaptiveSchedule:
  """QAConv-GS v2.1's adaptive schedule: ×`lr_factor` once the epoch loss falls below
  `step_factor` × the base loss, and then half as many epochs again (`adaptive_decision`)."""

  def __init__(self, step_factor: float, max_epochs: int, lr_factor: float = 0.1):
    if not step_factor > 0:
      raise ValueError(f"train.adaptive_step_factor must be positive, got {step_factor}.")
    self.step_factor, self.max_epochs, self.lr_factor = step_factor, max_epochs, lr_factor
    self.base_loss, self.stepped, self.final_epochs = None, False, max_epochs

  @property
  def lr_scale(self) -> float:
    return self.lr_factor if self.stepped else 1.0

  def end_epoch(self, epoch: int, mean_loss: float, state):
    self.base_loss, self.stepped, self.final_epochs, now = adaptive_decision(
        epoch, mean_loss, self.base_loss, self.stepped, self.final_epochs,
        step_factor=self.step_factor, max_epochs=self.max_epochs)
    if now:
      state = state.replace(opt_state=optim.set_lr_scale(state.opt_state, self.lr_scale))
    return state

  def describe(self) -> str:
    return (f"adaptive schedule: base loss {self.base_loss}, lr scale {self.lr_scale:g}, "
            f"final epoch {self.final_epochs}")

  def state_dict(self) -> dict:
    return {"base_loss": np.float64(math.nan if self.base_loss is None else self.base_loss),
            "stepped": np.bool_(self.stepped), "final_epochs": np.int64(self.final_epochs)}

  def load_state_dict(self, state: dict) -> None:
    base = float(state["base_loss"])
    self.base_loss = None if math.isnan(base) else base
    self.stepped, self.final_epochs = bool(state["stepped"]), int(state["final_epochs"])


def from_config(train_cfg):
  """The schedule `train.adaptive_step_factor` asks for (> 0), or None (fixed lr steps)."""
  factor = train_cfg.get("adaptive_step_factor", 0.0)
  if not factor:
    return None
  if tuple(train_cfg.lr_step_epochs):
    raise ValueError("train.adaptive_step_factor and train.lr_step_epochs both step the lr; set "
                     "train.lr_step_epochs = () to use the adaptive schedule.")
  return AdaptiveSchedule(factor, train_cfg.epochs, train_cfg.lr_step_factor)
