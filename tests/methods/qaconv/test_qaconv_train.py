"""Training by training: a tiny QAConv on synthetic_reid learns, resumes exactly, and runs the
same on 8 forced CPU devices as on one."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import qaconv, qaconv_gs
from jaxreid.checkpoint import restore_for_eval
from training import assert_learns_cross_domain, tiny

ROOT = Path(__file__).resolve().parents[3]


def test_tiny_qaconv_gs_learns_cross_domain(synthetic_data_dir, tmp_path):
  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, width=16, batch_size=32, epochs=3,
                lr_step_epochs=(2,))
  assert_learns_cross_domain(config, tmp_path)
  assert (tmp_path / "results.json").exists() and (tmp_path / "train.log").exists()
  assert any((tmp_path / "tensorboard").iterdir())


def test_tiny_qaconv_class_memory_learns_cross_domain(synthetic_data_dir, tmp_path):
  """Class-memory training with the focal loss (configs/qaconv.py)."""
  config = tiny(qaconv.get_config(), synthetic_data_dir, width=16, batch_size=32, epochs=8,
                lr_step_epochs=(6,))
  assert_learns_cross_domain(config, tmp_path)


def test_resume_after_interruption_equals_uninterrupted(synthetic_data_dir, tmp_path):
  from jaxreid.registry import train_and_evaluate
  config = tiny(qaconv.get_config(), synthetic_data_dir, epochs=2, lr_step_epochs=(1,))
  config.train.eval_every_epochs = 0
  full = train_and_evaluate(config, tmp_path / "full")
  interrupted = config.copy_and_resolve_references()
  interrupted.train.stop_at_step = 3          # mid-epoch 1, after a checkpoint at step ... none
  assert train_and_evaluate(interrupted, tmp_path / "split") == {}
  resumed = train_and_evaluate(config, tmp_path / "split")
  assert resumed["step"] == full["step"]
  _, a = restore_for_eval(str(tmp_path / "full" / "checkpoints"))
  _, b = restore_for_eval(str(tmp_path / "split" / "checkpoints"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert resumed["test"] == {k: {**v, "seconds": resumed["test"][k]["seconds"]}
                             for k, v in full["test"].items()}


def test_eight_devices_equal_one_device(synthetic_data_dir, tmp_path):
  """The whole first step (graph-sampler scoring, sharded batch, matcher BN statistics over the
  global pair matrix, gradients, optimiser) agrees to float rounding. Later steps are not
  compared tightly: a 1e-7 difference can flip an argmax of QAConv's max-pooling and then the
  runs drift apart like any two non-bitwise-identical trainings."""
  script = textwrap.dedent(f"""
      import jax, numpy as np, sys
      sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
      from training import tiny
      from configs import qaconv_gs
      from jaxreid import parallel
      from jaxreid.registry import train_and_evaluate
      from jaxreid.checkpoint import restore_for_eval
      assert jax.device_count() == 8
      config = tiny(qaconv_gs.get_config(), {synthetic_data_dir!r}, epochs=1)
      config.train.stop_at_step = 1
      for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        train_and_evaluate(config, {str(tmp_path)!r} + "/" + name, mesh=parallel.make_mesh(devices))
      _, a = restore_for_eval({str(tmp_path)!r} + "/one/checkpoints")
      _, b = restore_for_eval({str(tmp_path)!r} + "/eight/checkpoints")
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6), a, b)
      print("EQUAL")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
  assert out.returncode == 0 and "EQUAL" in out.stdout, out.stderr[-3000:]


def test_bf16_compute_trains_with_float32_parameters():
  """train.bf16: activations in bfloat16, parameters and optimiser state stay float32, and
  repeated steps on one batch lower the loss."""
  import jax.numpy as jnp
  from jaxreid import registry
  from jaxreid.registry import build_model
  from jaxreid.train.loop import create_train_state, make_train_step
  from jaxreid.train.optim import make_optimizer
  config = qaconv_gs.get_config()
  config.model.update(depth=18, width=8, neck=16)
  config.train.bf16 = True
  model = build_model(config)
  tx = make_optimizer(config.train, steps_per_epoch=10)
  objective = registry.method_of(config).objectives[config.train.loss]
  state = create_train_state(config, model, tx, objective, num_classes=4, num_images=8,
                             rng=jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 64, 32, 3)), jnp.uint8),
           "label": jnp.asarray(np.repeat(np.arange(4), 2), jnp.int32)}
  maps = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                     method="encode")
  assert maps.dtype == jnp.float32  # normalised in float32 after bf16 convolutions
  step = jax.jit(make_train_step(model, tx, objective, config.train))
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
