"""Multi-host data parallelism on one machine: 2 processes × 2 CPU devices, joined by
jax.distributed.initialize(), each loading its own rows of every batch; the first step must
equal the single-device step (see test_train.test_eight_devices_equal_one_device for why only
the first)."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

from configs import qaconv_gs
from jaxreid import parallel
from jaxreid.checkpoint import restore_for_eval
from jaxreid.registry import train_and_evaluate
from training import tiny

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                               process_id=int(sys.argv[1]))
    assert jax.process_count() == 2 and jax.device_count() == 4
    from training import tiny
    from configs import qaconv_gs
    from jaxreid.registry import train_and_evaluate
    config = tiny(qaconv_gs.get_config(), {data_dir!r}, epochs=1)
    config.train.stop_at_step = 1
    train_and_evaluate(config, {workdir!r})
    print("WORKER DONE")
""")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_device(synthetic_data_dir, tmp_path):
  script = WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), port=free_port(),
                         data_dir=synthetic_data_dir, workdir=str(tmp_path / "multi"))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workers = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  outputs = [w.communicate(timeout=600)[0] for w in workers]
  for w, out in zip(workers, outputs):
    assert w.returncode == 0 and "WORKER DONE" in out, out[-3000:]

  config = tiny(qaconv_gs.get_config(), synthetic_data_dir, epochs=1)
  config.train.stop_at_step = 1
  train_and_evaluate(config, tmp_path / "single", mesh=parallel.make_mesh(jax.devices()[:1]))
  _, a = restore_for_eval(str(tmp_path / "single" / "checkpoints"))
  _, b = restore_for_eval(str(tmp_path / "multi" / "checkpoints"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6), a, b)
