"""configs/pat.py's paper settings: each tests on datasets it does not train on; the multi-source
ones leave exactly one of the four out; all build the ViT-B/16 PAT at 256×128 (shapes only)."""
import jax
import numpy as np
import pytest

from configs import pat
from jaxreid import registry

FOUR = {"market1501", "dukemtmc_reid", "msmt17", "cuhk03_np/detected"}


@pytest.mark.parametrize("setting", sorted(pat.PAPER))
def test_paper_settings(setting):
  c = pat.get_config(setting)
  train, test = set(c.dataset.train.split(",")), set(c.dataset.test.split(","))
  assert not train & test and train | test == FOUR
  assert set(c.eval.paper) == test and (len(train) == 1) == (setting == "market")
  assert (c.model.vit_dim, c.model.vit_depth, c.model.vit_heads, c.model.stride_size) == (
      768, 12, 12, 16)
  assert (c.model.input_height, c.model.input_width) == (256, 128) and c.model.freeze_patch_embed
  # the official loader's RandomIdentitySampler; the bank pre-filled over one pass of it;
  # deterministic full-band test masks unless asked
  assert c.data.sampler == "identity" and (c.data.batch_size, c.data.num_instances) == (64, 4)
  assert c.train.pat.prefill and not c.model.random_test_masks
  c.model.num_classes = 10
  shapes = jax.eval_shape(registry.build_model(c).init, jax.random.key(0),
                          np.zeros((1, 256, 128, 3), np.uint8))
  assert shapes["params"]["encoder"]["backbone"]["pos_embed"].shape == (1, 4 + 16 * 8, 768)
  assert "patch_embed_kernel" in shapes["batch_stats"]["encoder"]["backbone"]


def test_unknown_setting_is_one_clear_error():
  with pytest.raises(ValueError, match="no setting 'duke'"):
    pat.get_config("duke")


def official_cosine_lr(base, e):
  """The official scheduler (timm CosineLRScheduler with t_initial 120, lr_min 0.002·lr,
  warmup_lr_init 0.01·lr, warmup_t 5, no warmup prefix) at scheduler epoch e."""
  init, low = 0.01 * base, 0.002 * base
  if e < 5:
    return init + e * (base - init) / 5
  return low + 0.5 * (base - low) * (1 + np.cos(np.pi * e / 120))


def test_paper_schedule_is_the_official_cosine():
  from jaxreid.train.optim import lr_schedule
  c = pat.get_config("market")
  steps = 7
  schedule = lr_schedule(c.train, steps)
  for epoch in range(c.train.epochs):      # the official loop calls scheduler.step(epoch + 1)
    for step in (epoch * steps, epoch * steps + steps - 1):
      np.testing.assert_allclose(float(schedule(step)), official_cosine_lr(1e-3, epoch + 1),
                                 rtol=1e-5)


def test_bias_lr_is_doubled():
  import jax.numpy as jnp
  from jaxreid.train.optim import make_optimizer
  c = pat.get_config("market")
  c.train.update(momentum=0.0, lr_schedule="step", lr_step_epochs=(), warmup_epochs=0)
  params = {"encoder": {"backbone": {"blocks_0": {"attn": {"qkv": {
      "kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}}}}, "head": {"bottleneck": {
          "scale": jnp.ones(2)}}}
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  tx = make_optimizer(c.train, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  step = -1e-3 * (0.5 + 1e-4)            # −lr·(g + wd·p) with p = 1
  qkv = updates["encoder"]["backbone"]["blocks_0"]["attn"]["qkv"]
  np.testing.assert_allclose(qkv["kernel"], step, rtol=1e-6)
  np.testing.assert_allclose(qkv["bias"], 2 * step, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bottleneck"]["scale"], step, rtol=1e-6)
