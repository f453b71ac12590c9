"""--mode=convert: an official QAConv .pth.tar → a jaxreid checkpoint folder that
`jaxreid.load` and --mode=eval read in an interpreter where torch cannot be imported (a
sitecustomize on PYTHONPATH puts a meta-path finder first that refuses `torch`, as an
interpreter without torch installed would; cheaper than building a venv)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreid import registry
from jaxreid.api import load_config_file
from jaxreid.models import init_variables

ROOT = Path(__file__).resolve().parents[1]
H, W = 64, 32
BLOCK_TORCH = '''import sys


class _NoTorch:
  """Refuses torch, as an interpreter without it installed does."""

  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
    return None


sys.meta_path.insert(0, _NoTorch())
'''


def run(args, *, env=None, code=None):
  command = [sys.executable] + (["-c", code] if code else ["main.py", *args])
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """(path of an official-layout QAConv .pth.tar of a tiny model, its variables)."""
  import torch
  config = load_config_file(ROOT / "configs" / "qaconv.py")
  config.model.update(depth=18, width=8)
  config.data.update(height=H, width=W)
  model = registry.build_model(config)
  variables = init_variables(model, jax.random.key(0), H, W)
  variables = jax.tree.map(lambda x: x + 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                           variables)
  state = registry.get("qaconv").export(variables)
  state = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), state)
  path = tmp_path_factory.mktemp("official") / "checkpoint.pth.tar"
  torch.save(state, path)
  return path, model, variables


def test_convert_then_load_and_eval_without_torch(official, synthetic_data_dir, tmp_path):
  path, model, variables = official
  out_dir = tmp_path / "converted"
  converted = run(["--config", "qaconv", f"--checkpoint={path}", "--mode=convert",
                   f"--output={out_dir}", f"--workdir={tmp_path / 'work'}",
                   f"--config.data.height={H}", f"--config.data.width={W}"])
  assert converted.returncode == 0, converted.stderr[-3000:]
  assert str(out_dir) in converted.stdout and (out_dir / "best" / "0").is_dir()

  blocker = tmp_path / "no_torch"
  blocker.mkdir()
  (blocker / "sitecustomize.py").write_text(BLOCK_TORCH)
  env = {"PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
  images = np.random.default_rng(0).integers(0, 256, (3, H, W, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  code = f'''
import sys
import numpy as np
try:
  import torch
  sys.exit("torch was importable")
except ModuleNotFoundError:
  pass
import jaxreid
model = jaxreid.load("qaconv", {str(out_dir)!r})
maps = model.encode(np.load({str(tmp_path / "images.npy")!r}))
np.savez({str(tmp_path / "out.npz")!r}, maps=maps, scores=model.match(maps, maps),
         size=np.array(model.input_size))
assert "torch" not in sys.modules
'''
  loaded = run([], env=env, code=code)
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  out = np.load(tmp_path / "out.npz")
  want = model.apply(variables, images, method="encode")
  assert tuple(out["size"]) == (H, W)
  np.testing.assert_allclose(out["maps"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["scores"], model.apply(variables, want, want, method="match"),
                             rtol=1e-4, atol=1e-4)

  workdir = tmp_path / "eval"
  evaluated = run(["--config", "qaconv", "--mode=eval", f"--checkpoint={out_dir}",
                   f"--workdir={workdir}", f"--config.dataset.data_dir={synthetic_data_dir}",
                   "--config.dataset.test=synthetic_reid/domain_b", "--config.eval.rerank=False",
                   "--config.eval.tlift=False", "--config.eval.batch_size=32"], env=env)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  (entry,) = results["test"].values()
  # The printed table holds the results.json numbers, and the line naming results.json.
  row = next(line for line in evaluated.stdout.splitlines() if line.startswith("plain"))
  assert [float(v) for v in row.split()[1:]] == [entry[c] for c in ("R1", "R5", "R10", "mAP",
                                                                     "mINP")]
  assert str(workdir / "results.json") in evaluated.stdout


def test_convert_needs_a_checkpoint_and_an_empty_output(official, tmp_path):
  path, _, _ = official
  missing = run(["--config", "qaconv", "--mode=convert", f"--workdir={tmp_path}"])
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1].startswith("error: --mode=convert needs "
                                                            "--checkpoint")
  args = ["--config", "qaconv", f"--checkpoint={path}", "--mode=convert",
          f"--output={tmp_path / 'out'}", f"--workdir={tmp_path}"]
  # Without --config.data.height/width an official file is read at its authors' 384×128 (not
  # the synthetic config's 64×32): this 64×32 head does not fit there.
  default_size = run(args)
  assert default_size.returncode == 2
  assert "384×128" in default_size.stderr.strip().splitlines()[-1]
  args += [f"--config.data.height={H}", f"--config.data.width={W}"]
  assert run(args).returncode == 0
  again = run(args)
  assert again.returncode == 2
  assert "already holds a checkpoint" in again.stderr.strip().splitlines()[-1]
