"""`pip install .` into a fresh virtual environment gives a `jaxreid` command that finds the
shipped configs by name and trains from any folder. The library's dependencies come from the
environment running the tests (a venv, a conda env or the machine's interpreter: a .pth file adds
its site-packages), so only the project itself is installed."""
import shutil
import site
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_then_jaxreid_command_trains(tmp_path, synthetic_data_dir):
  env_dir = tmp_path / "venv"
  venv.EnvBuilder(with_pip=True).create(env_dir)
  python = env_dir / "bin" / "python"
  env_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
  ours = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
  (Path(env_site) / "parent_environment.pth").write_text("\n".join(ours) + "\n")
  source = tmp_path / "source"   # setuptools builds in the source tree: build from a copy
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      ".git", "workdir*", "__pycache__", ".pytest_cache", "build", "*.egg-info", "tests", ".venv",
      ".ci-venv"))
  install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert install.returncode == 0, install.stderr[-2000:]
  where = subprocess.run([str(python), "-c", "import jaxreid, configs; print(jaxreid.__file__);"
                          "print(configs.__file__)"], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout.split()
  assert all(str(env_dir) in path for path in where), where     # the installed copies
  workdir = tmp_path / "run"
  out = subprocess.run(
      [str(env_dir / "bin" / "jaxreid"), "--config", "transmatcher", f"--workdir={workdir}",
       f"--config.dataset.data_dir={synthetic_data_dir}", "--config.model.depth=18",
       "--config.model.width=8", "--config.model.neck=16", "--config.model.ffn=32",
       "--config.data.batch_size=16", "--config.train.stop_at_step=1", "--compilation_cache="],
      capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (workdir / "checkpoints" / "1").is_dir() and (workdir / "config.json").is_file()
