"""Parameter groups: backbone lr ×0.1, per-group gradient clipping, step schedule."""
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxreid.train.optim import make_optimizer


def train_cfg(**kw):
  c = ml_collections.ConfigDict(dict(lr=0.1, backbone_lr_mult=0.1, lr_step_epochs=(2,),
                                     lr_step_factor=0.1, momentum=0.0, nesterov=False,
                                     weight_decay=0.0, clip_norm=1.0))
  c.update(kw)
  return c


PARAMS = {"encoder": {"backbone": {"w": jnp.ones(4)}, "neck_conv": {"w": jnp.ones(4)}},
          "matcher": {"fc": {"w": jnp.ones(4)}}}


def test_groups_clip_and_lr_multiplier():
  tx = make_optimizer(train_cfg(), steps_per_epoch=3)
  grads = {"encoder": {"backbone": {"w": jnp.full(4, 3.0)}, "neck_conv": {"w": jnp.full(4, 4.0)}},
           "matcher": {"fc": {"w": jnp.full(4, 0.1)}}}
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  # features group (backbone + neck) has norm sqrt(4*9 + 4*16) = 10 → scaled by 1/10.
  np.testing.assert_allclose(updates["encoder"]["backbone"]["w"], -0.1 * 0.1 * 0.3, rtol=1e-6)
  np.testing.assert_allclose(updates["encoder"]["neck_conv"]["w"], -0.1 * 0.4, rtol=1e-6)
  # matcher group norm 0.2 < 1: unclipped, full lr.
  np.testing.assert_allclose(updates["matcher"]["fc"]["w"], -0.1 * 0.1, rtol=1e-6)


def test_step_schedule_and_weight_decay():
  tx = make_optimizer(train_cfg(clip_norm=0.0, weight_decay=0.5), steps_per_epoch=3)
  zeros = {"encoder": {"backbone": {"w": jnp.zeros(4)}, "neck_conv": {"w": jnp.zeros(4)}},
           "matcher": {"fc": {"w": jnp.zeros(4)}}}
  state = tx.init(PARAMS)
  seen = []
  for _ in range(8):
    updates, state = tx.update(zeros, state, PARAMS)
    seen.append(float(updates["matcher"]["fc"]["w"][0]))
  # grad 0 + wd 0.5 * param 1 → update = -lr * 0.5; lr drops ×0.1 after 2 epochs = 6 steps.
  np.testing.assert_allclose(seen[:6], [-0.05] * 6, rtol=1e-6)
  np.testing.assert_allclose(seen[6:], [-0.005] * 2, rtol=1e-6)
