"""bench/zoo.py end to end in smoke mode on two small entries: training runs, untrained
evaluations and QAConv-GS's re-ranking / TLift evaluation in child processes; the records hold
what their workdirs' results.json hold, the machine record what the run used, and the render
shows it."""
import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT


def _module(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_entry_names_a_shipped_config_and_fields_it_has():
  zoo = _module("zoo")
  configs = {p.name for p in (ROOT / "configs").glob("*.py")} - {"__init__.py", "common.py"}
  assert {os.path.basename(e.config) for e in zoo.ENTRIES} == configs   # every default config
  assert len(set(zoo.entry_names())) == len(zoo.ENTRIES)
  for e in zoo.ENTRIES:
    assert e.family in zoo.FAMILIES
    assert all(zoo._has_field(zoo._config(e.config), k) for k in e.overrides), e


def test_smoke_run_records_what_its_workdirs_hold(synthetic_data_dir, tmp_path):
  out, root = tmp_path / "zoo.jsonl", tmp_path / "runs"
  proc = subprocess.run(
      [sys.executable, "bench/zoo.py", "--only", "embedding,qaconv_gs", "--smoke", f"--root={root}",
       f"--out={out}", "--compilation-cache=~/.cache/jaxreid/xla-tests",
       "--override", f"dataset.data_dir={synthetic_data_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  machine, gs, run = (json.loads(line) for line in out.read_text().splitlines())
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  assert machine["kind"] == "machine" and machine["smoke"] and machine["commit"] == head
  assert machine["cores"] == os.cpu_count() and len(machine["load_after"]) == 3
  assert machine["backend"] == "cpu" and run["run"] == gs["run"] == machine["run"]

  # QAConv-GS's --mode=eval with re-ranking and TLift of the trained run: its rows, and a plain
  # row equal to the training run's own evaluation of the same (final = best) checkpoint.
  post = json.loads((root / "qaconv_gs-post" / "results.json").read_text())
  ((test, metrics),) = post["test"].items()
  assert gs["post"]["test_set"] == test and list(gs["post"]["rows"]) == list(metrics["rows"])
  assert list(metrics["rows"]) == ["plain", "+TLift", "+RR", "+RR+TLift"]
  for row, m in metrics["rows"].items():
    assert gs["post"]["rows"][row] == {**{k: m[k] for k in ("R1", "R5", "R10", "mAP", "mINP")},
                                       "seconds": round(m["seconds"], 2)}
  assert {k: gs["post"]["rows"]["plain"][k] for k in ("R1", "mAP", "mINP")} == {
      k: gs[k] for k in ("R1", "mAP", "mINP")}
  assert "--config.eval.tlift=True" in gs["post"]["command"]

  results = json.loads((root / "embedding" / "results.json").read_text())
  ((test, metrics),) = results["test"].items()
  assert run["kind"] == "run" and run["name"] == "embedding" and run["smoke"]
  assert run["test_set"] == test == "synthetic_reid/domain_a"
  assert {k: run[k] for k in ("R1", "R5", "R10", "mAP", "mINP")} == {
      k: metrics[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}
  assert run["step"] == results["step"] > 0
  assert run["overrides"]["train.epochs"] == "1"
  assert run["overrides"]["dataset.data_dir"] == synthetic_data_dir
  assert f"--config.dataset.data_dir={synthetic_data_dir}" in run["command"]
  untrained = json.loads((root / "embedding-untrained" / "results.json").read_text())
  assert untrained["step"] == 0 and run["untrained"]["mAP"] == untrained["test"][test]["mAP"]
  assert 0 < run["eval_s"] == round(metrics["seconds"], 1) < run["wall_s"]
  assert run["train_s"] == round(run["wall_s"] - run["eval_s"], 1)
  assert run["peak_rss_mb"] > 100 and run["untrained"]["peak_rss_mb"] > 100
  assert run["device"].endswith("× cpu")

  tables = _module("readme_tables")
  docs = tables.results_md(out)
  assert f"| `embedding` (smoke) | {test} | {run['R1']:.2f} |" in docs
  assert f"**{run['mAP']:.2f}**" in docs and "| `nformer` | not run yet |" in docs
  assert f"| + RR + TLift | {gs['post']['rows']['+RR+TLift']['R1']:.2f} |" in (
      tables.postprocessing_table(gs, tables.zoo_records(out)[0]))
  table = tables.zoo_table(["embedding"], *tables.zoo_records(out))
  assert "smoke run, not a result" in table and f"{run['untrained']['mAP']:.2f}" in table
