"""notebooks/colab_tpu.ipynb runs top to bottom on CPU with a tiny setting (two forced host
devices, so the batch is really sharded): it trains, stops, resumes, evaluates, restores the
checkpoint for evaluation and shows the pictures inline. Nothing is downloaded: the parameters
cell is followed by an injected one (papermill's convention) whose SOURCE is this checkout, so
the install cell runs pip on its requirements.txt (all in place already; proxies that refuse
make any download fail at once) and imports jaxreid in place, with a tiny model and the
session's synthetic_reid. The shipped placeholder SOURCE stops the notebook with one sentence,
and every kind of SOURCE maps to a pip command that installs the dependencies."""
import ast
import base64
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
KERNEL = "jaxreid-test"
STOP = 3

# What tests/training.py's `tiny` sets, as the notebook's dotted OVERRIDES.
TINY = {"model.depth": 18, "model.width": 8, "model.neck": 16, "model.ffn": 32,
        "model.num_layers": 2, "model.encoders": 1, "data.batch_size": 16,
        "data.num_instances": 4, "data.num_threads": 1, "data.height": 64, "data.width": 32,
        "data.augment.color_jitter": False, "train.epochs": 1, "train.lr_step_epochs": (1,),
        "train.log_every_steps": 5, "train.checkpoint_every_steps": 100,
        "eval.batch_size": 64, "eval.tile_p": 64, "eval.tile_g": 256}


def _kernel_spec(folder: Path) -> Path:
  """A Jupyter data folder whose one kernel runs this interpreter (sys.executable)."""
  spec = folder / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "jaxreid test", "language": "python"}))
  return folder


def _inject(nb, parameters: dict) -> None:
  """Inserts a cell setting `parameters` after the cell tagged "parameters"."""
  tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(tagged[0] + 1, cell)
  # Every parameter the test sets is one the notebook has (a renamed one would be ignored).
  defined = set(re.findall(r"^([A-Z_]+) =", nb.cells[tagged[0]].source, re.M))
  assert set(parameters) <= defined, set(parameters) - defined


def _text(cell) -> str:
  """The cell's stdout (stderr has the progress bars)."""
  return "".join(out.text for out in cell.outputs
                 if out.output_type == "stream" and out.name == "stdout")


def _cell(nb, marker: str):
  """The one code cell whose source contains `marker`."""
  found = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
  assert len(found) == 1, (marker, len(found))
  return found[0]


def _maps(text: str, prefix: str) -> list[float]:
  return [float(m) for m in re.findall(rf"^{prefix}.*?mAP (\d+\.\d+)", text, re.M)]


def _offline_kernel(tmp_path, monkeypatch) -> None:
  """The test kernel for NotebookClient, with every download failing at once."""
  monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path / "jupyter")))
  for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    monkeypatch.setenv(proxy, "http://127.0.0.1:9")
  monkeypatch.setenv("no_proxy", "")
  monkeypatch.setenv("NO_PROXY", "")


def _one_sentence(text: str) -> bool:
  """One line holding one sentence: a full stop at the end and no sentence break before it."""
  return "\n" not in text and text.endswith(".") and not re.search(r"[.!?]\s", text)


def _install_definitions() -> dict:
  """What the install cell defines (its imports, constants, Stop, install_plan, …), run without
  the statements after them that call pip."""
  source = _cell(nbformat.read(NOTEBOOK, as_version=4), "def install_plan(").source
  body = ast.parse(source).body
  definitions = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)
  count = next(i for i, node in enumerate(body) if not (
      isinstance(node, definitions) or isinstance(node, ast.Assign)
      and isinstance(node.value, (ast.Constant, ast.Tuple))))
  assert any(isinstance(node, ast.With) for node in body[count:])   # the pip call is left out
  namespace = {}
  exec(compile(ast.Module(body[:count], type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
  return namespace


def test_placeholder_source_stops_with_one_sentence(tmp_path, monkeypatch):
  """The notebook as shipped, run as on a fresh runtime: the install cell shows one sentence
  (no traceback, no pip run) and nothing after it runs."""
  _offline_kernel(tmp_path, monkeypatch)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=120, kernel_name=KERNEL,
                          resources={"metadata": {"path": str(tmp_path)}})
  with pytest.raises(CellExecutionError):
    client.execute()
  install = _cell(nb, "def install_plan(")
  assert [out.output_type for out in install.outputs] == ["error"], install.outputs
  error = install.outputs[0]
  assert error.ename == "Stop" and len(error.traceback) == 1, error
  sentence = error.traceback[0]
  assert _one_sentence(sentence), sentence
  assert sentence.startswith("SOURCE is still the placeholder: set it in the parameters cell")
  after = nb.cells[nb.cells.index(install) + 1:]
  assert not [c for c in after if c.cell_type == "code" and (c.outputs or c.execution_count)]


def test_each_source_installs_jaxreid_and_its_dependencies(tmp_path):
  definitions = _install_definitions()
  install_plan, stop = definitions["install_plan"], definitions["Stop"]
  git = "git+https://github.com/someone/jaxreid.git@v0.1.0"
  url = "https://github.com/someone/jaxreid/archive/refs/heads/main.zip"
  files = [tmp_path / name for name in ("jaxreid-0.1.0-py3-none-any.whl", "jaxreid.zip",
                                        "jaxreid-main.tar.gz", "jaxreid.tgz")]
  for path in files:
    path.write_bytes(b"")
  pip = [sys.executable, "-m", "pip", "install"]
  for tpu in (False, True):
    for source in [git, url] + [str(path) for path in files]:
      command, in_place = install_plan(source, tpu)
      # pip installs a package with the dependencies in its metadata unless told otherwise.
      assert command[:4] == pip and source in command and in_place is None, command
      assert not {"--no-deps", "--no-index", "-e", "--editable"} & set(command), command
      assert ("jax[tpu]" in command) == tpu, command
    # A checkout: its requirements (the same as pyproject's dependencies, test_dependencies.py)
    # are installed and the folder is imported in place.
    command, in_place = install_plan(f" {ROOT} ", tpu)
    assert command[:4] == pip and in_place == str(ROOT), (command, in_place)
    assert command[command.index("-r") + 1] == str(ROOT / "requirements.txt"), command
    assert ("jax[tpu]" in command) == tpu, command
  (tmp_path / "jaxreid.txt").write_text("")
  for source, start in [(definitions["PLACEHOLDER"], "SOURCE is still the placeholder"),
                        (tmp_path / "missing.whl", f"SOURCE {tmp_path}/missing.whl is neither"),
                        (tmp_path, f"SOURCE {tmp_path} is a folder without requirements.txt"),
                        (tmp_path / "jaxreid.txt", f"SOURCE {tmp_path}/jaxreid.txt is not a")]:
    with pytest.raises(stop) as stopped:
      install_plan(source, False)
    message = str(stopped.value)
    assert message.startswith(start) and _one_sentence(message), message
    assert stopped.value._render_traceback_() == [message]   # what IPython shows: that alone


def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch, synthetic_data_dir):
  _offline_kernel(tmp_path, monkeypatch)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  workdir = tmp_path / "run"
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
  assert not stale, f"cells {stale} of {NOTEBOOK.name} are stored with outputs; clear them"
  _inject(nb, dict(SOURCE=str(ROOT), MOUNT_DRIVE=False,
                   DATA_DIR=synthetic_data_dir, WORKDIR=str(workdir), OVERRIDES=TINY,
                   STOP_AT_STEP=STOP, NUM_PAIRS=2, NUM_MATCHES=8, RANK_LIST_LENGTH=5,
                   MAX_PICTURES=2))
  NotebookClient(nb, timeout=300, kernel_name=KERNEL,
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  nbformat.write(nb, tmp_path / "executed.ipynb")   # for a look after a failure

  install = _text(_cell(nb, "print(\"jaxreid from\""))
  assert f"$ {sys.executable} -m pip install " in install, install
  assert f" -r {ROOT / 'requirements.txt'}" in install, install
  assert f"python {sys.executable}" in install and f"jaxreid from {ROOT / 'jaxreid'}" in install
  devices = _text(_cell(nb, "jax.devices()"))
  assert "devices: [CpuDevice(id=0), CpuDevice(id=1)]" in devices, devices
  assert "2 CPU device(s)" in devices
  assert "2 devices: every batch is split 2 ways along its first axis" in devices, devices
  config = _text(_cell(nb, "make_mesh()"))
  assert "each batch of 16 is sharded as 8 image(s) per device over 2 device(s)" in config, config
  assert "synthetic_reid" in _text(_cell(nb, "build_datasets(config)"))

  stopped = _text(_cell(nb, "results = train(stop_at_step=STOP_AT_STEP)"))
  assert f"checkpoints after:  [{STOP}]" in stopped, stopped
  assert f"stopped at step {STOP}" in stopped
  resumed = _text(_cell(nb, "results = train()\n"))
  assert f"resumed from step {STOP}" in resumed, resumed
  trained = _maps(resumed, "synthetic_reid/domain_b: R1")
  assert len(trained) == 1, resumed
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[0] >= STOP and steps[-1] > STOP, steps
  assert any(p.name.isdigit() for p in (workdir / "best").iterdir())
  results = json.loads((workdir / "results.json").read_text())
  assert results["test"]["synthetic_reid/domain_b"]["mAP"] == trained[0]

  restore = _cell(nb, "evaluate_checkpoint(config, WORKDIR)")
  restored = _maps(_text(restore), "restored synthetic_reid/domain_b: R1")
  assert len(restored) == 1 and abs(restored[0] - trained[0]) < 0.05, (restored, trained)
  assert "match logits of two blank images: (2, 2)" in _text(restore)

  pictures = _cell(nb, "display(Image(")
  shown, name = {}, None      # each image under the file name printed before it
  for out in pictures.outputs:
    if out.output_type == "stream" and out.name == "stdout":
      name = out.text.strip().splitlines()[-1]
    elif out.output_type == "display_data" and "image/png" in out.data:
      shown[name] = base64.b64decode(out.data["image/png"])
  assert all(png.startswith(b"\x89PNG") for png in shown.values()), list(shown)
  matches = [n for n in shown if n.endswith(".png") and "rank" not in n]
  rank_lists = [n for n in shown if n.endswith(".png") and "rank" in n]
  assert 1 <= len(matches) <= 2, _text(pictures)
  assert all((workdir / "visualize" / n).is_file() for n in matches)
  assert 1 <= len(rank_lists) <= 2, _text(pictures)
