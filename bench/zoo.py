"""The synthetic model zoo: trains and evaluates every method's default config on
synthetic_reid, each in a child process and a fresh workdir, and writes one JSON line per run
(and one per invocation describing the machine) to --out; `python bench/readme_tables.py` then
renders docs/results.md and the README's result tables from that file.

  python bench/zoo.py --out bench/results/zoo.jsonl     # everything (about an hour on 2 CPU cores)
  python bench/zoo.py --only kpm,pat --append           # redo two entries, keep the others
  python bench/zoo.py --only embedding --smoke          # a tiny version: checks the pipeline

Per entry it runs `python main.py --config CONFIG --workdir ROOT/NAME [--config.FIELD=VALUE …]`
and then `python bench/zoo_untrained.py` with the same config in ROOT/NAME-untrained (the model
the training starts from, evaluated the same way); an entry with post_eval fields also gets a
`--mode=eval` of its trained run with them (QAConv-GS with re-ranking and TLift) in
ROOT/NAME-post. Recorded: the first test set's R1, R5, R10, mAP, mINP (and post-processed rows,
NFormer's stage-1 numbers) from the run's results.json; the
untrained model's; wall_s, the training command's wall clock (start-up, training, evaluation);
eval_s, the seconds results.json gives its evaluations (encoding, scoring and metrics, compiling
included; stage 1's too for NFormer); train_s = wall_s − eval_s; peak_rss_mb of each child
(os.wait4's ru_maxrss); the device the child saw; the commit. The XLA compilation cache is off
unless --compilation-cache names one, so the times include compiling, as on a first run.
"""
import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # also when loaded by path
from harness import cpu_name, git_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "results", "zoo.jsonl")
METRICS = ("R1", "R5", "R10", "mAP", "mINP")


class Entry(NamedTuple):
  name: str                  # the record's key, --only's
  config: str                # config file (relative to the repository), optionally ':setting'
  overrides: dict            # field → value, passed as --config.FIELD=VALUE
  family: str                # the docs/results.md section (FAMILIES)
  label: str                 # what the row is, in a few words
  post_eval: dict = {}       # fields of a --mode=eval of the trained run (RR, TLift), recorded


FAMILIES = {
    "qaconv": "QAConv and QAConv-GS",
    "transmatcher": "TransMatcher and the paper's Table 2 models",
    "kpm": "KPM",
    "nformer": "Embedding baseline and NFormer",
    "pat": "PAT",
}
FOUR_EPOCHS = {"train.epochs": "4", "train.lr_step_epochs": "(3,)"}
RAW = {"model.normalize": "False"}
ENTRIES = (
    Entry("qaconv_gs", "configs/qaconv_gs.py", {}, "qaconv",
          "QAConv-GS (GS sampler, pairwise BCE, 12 epochs)",
          {"eval.rerank": "True", "eval.tlift": "True"}),
    Entry("qaconv", "configs/qaconv.py", {}, "qaconv",
          "QAConv (class memory, focal loss, 20 epochs)"),
    Entry("transmatcher", "configs/transmatcher.py", {}, "transmatcher", "TransMatcher"),
    Entry("qaconv_gs_4ep", "configs/qaconv_gs.py", FOUR_EPOCHS, "transmatcher",
          "QAConv-GS at the same 4 epochs, step at 3"),
    Entry("transformer_cross", "configs/transformer_cross.py", {}, "transmatcher",
          "Transformer-Cross"),
    Entry("transformer_cat", "configs/transformer_cat.py", {}, "transmatcher", "Transformer-Cat"),
    Entry("vit", "configs/vit.py", {}, "transmatcher", "ViT"),
    Entry("vanilla_transformer", "configs/vanilla_transformer.py", {}, "transmatcher",
          "vanilla Transformer"),
    Entry("transmatcher_raw", "configs/transmatcher.py", RAW, "transmatcher",
          "TransMatcher, unnormalised neck maps"),
    Entry("transformer_cross_raw", "configs/transformer_cross.py", RAW, "transmatcher",
          "Transformer-Cross, unnormalised neck maps"),
    Entry("transformer_cat_raw", "configs/transformer_cat.py", RAW, "transmatcher",
          "Transformer-Cat, unnormalised neck maps"),
    Entry("vit_raw", "configs/vit.py", RAW, "transmatcher", "ViT, unnormalised neck maps"),
    Entry("vanilla_transformer_raw", "configs/vanilla_transformer.py", RAW, "transmatcher",
          "vanilla Transformer, unnormalised neck maps"),
    Entry("kpm", "configs/kpm.py", {}, "kpm", "KPM (raw maps, the default)"),
    Entry("kpm_normalized", "configs/kpm.py", {"model.normalize": "True"}, "kpm",
          "KPM, normalised maps"),
    Entry("embedding", "configs/embedding.py", {}, "nformer",
          "embedding baseline (NFormer's stage 1, 12 epochs)"),
    Entry("nformer", "configs/nformer.py", {}, "nformer",
          "NFormer (stage 1 + NFormer, 3 epochs)"),
    Entry("pat", "configs/pat.py", {}, "pat",
          "PAT (Adam 2e-3, from scratch, part memory pre-filled)"),
    Entry("embedding_pat_budget", "configs/embedding.py",
          {"model.width": "8", "train.epochs": "6", "train.lr_step_epochs": "(5,)"}, "pat",
          "embedding baseline at PAT's budget (ResNet-18 stem 8, 6 epochs)"),
)
# --smoke: a tiny version of every entry (each field where the entry's config has it), for
# checking the pipeline in seconds; its records say smoke: true.
SMOKE = {"model.depth": "18", "model.width": "8", "model.vit_depth": "1", "model.ffn": "32",
         "model.rsa_channels": "16", "data.batch_size": "64", "data.num_threads": "1",
         "train.epochs": "1", "train.lr_step_epochs": "()", "train.warmup_epochs": "0",
         "nformer.epochs": "1"}


def entry_names() -> list[str]:
  return [e.name for e in ENTRIES]


def _config(path: str):
  """The ConfigDict of a config file 'configs/x.py[:setting]' (no jax import)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  file, _, setting = path.partition(":")
  module = importlib.import_module("configs." + os.path.splitext(os.path.basename(file))[0])
  return module.get_config(setting) if setting else module.get_config()


def _has_field(config, field: str) -> bool:
  node = config
  for key in field.split("."):
    if not hasattr(node, "keys") or key not in node:
      return False
    node = node[key]
  return True


def overrides_of(entry: Entry, smoke: bool, extra: dict) -> dict:
  """The entry's overrides, then the --smoke fields its config has, then --override's."""
  out = dict(entry.overrides)
  if smoke:
    config = _config(entry.config)
    out.update({k: v for k, v in SMOKE.items() if _has_field(config, k)})
  out.update(extra)
  return out


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def display_command(config: str, overrides: dict) -> str:
  """The training command of a record as a reader types it (no --workdir)."""
  return " ".join(["python main.py --config", config, *_flags(overrides)])


def run_child(argv: list[str], log_path: str) -> tuple[int, float, float]:
  """(exit status, wall seconds, peak RSS in MB) of `argv` run from the repository root, its
  stdout and stderr in `log_path`; the RSS is the child's own (os.wait4)."""
  with open(log_path, "w") as log:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
  proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
  return proc.returncode, wall, usage.ru_maxrss / 1024


def _metrics(entry: dict) -> dict:
  return {k: entry[k] for k in METRICS if k in entry}


def _devices(log_path: str) -> str | None:
  """'1× cpu' from the `devices: [CpuDevice(id=0)]; workdir: …` line both children print."""
  with open(log_path, errors="replace") as f:
    for line in f:
      match = re.match(r"devices: \[(.*)\]; workdir:", line)
      if match:
        kinds = re.findall(r"(\w+?)Device\(", match.group(1))
        return f"{len(kinds)}× {kinds[0].lower()}" if kinds else None
  return None


def _eval_seconds(results: dict) -> float:
  """The seconds results.json gives the run's evaluations (NFormer: stage 1's and the refined)."""
  tests = list(results.get("test", {}).values())
  tests += list(results.get("stage1", {}).get("test", {}).values())
  return sum(t.get("seconds", 0.0) for t in tests)


def _failure(rc: int, log: str) -> dict:
  """The record fields of a child that exited with status `rc`: the status and its log's tail."""
  with open(log, errors="replace") as f:
    return {"error": f"exit status {rc}", "log_tail": f.read()[-2000:]}


def _read_results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def post_evaluate(entry: Entry, workdir: str, common: list[str], root: str) -> dict:
  """`--mode=eval` of the trained `workdir` with the entry's post_eval fields (re-ranking,
  TLift), into workdir-post: every row of its first test set with the row's seconds."""
  post_dir = workdir + "-post"
  log = os.path.join(root, f"{entry.name}-post.log")
  rc, wall, rss = run_child([sys.executable, "main.py", "--mode=eval", f"--checkpoint={workdir}",
                             f"--workdir={post_dir}", *common, *_flags(entry.post_eval)], log)
  post = {"overrides": dict(entry.post_eval), "wall_s": round(wall, 1),
          "peak_rss_mb": round(rss), "log": log,
          "command": display_command(entry.config, entry.post_eval) + " --mode=eval"}
  if rc != 0:
    return {**post, **_failure(rc, log)}
  test, metrics = next(iter(_read_results(post_dir)["test"].items()))
  post.update(test_set=test, rows={
      row: {**_metrics(m), "seconds": round(m.get("seconds", 0.0), 2)}
      for row, m in metrics.get("rows", {"plain": metrics}).items()})
  return post


def run_entry(entry: Entry, root: str, overrides: dict, cache: str) -> dict:
  """Trains and evaluates one entry, then evaluates its untrained model: the record."""
  workdir = os.path.join(root, entry.name)
  if os.path.exists(workdir):
    raise ValueError(f"{workdir} exists; the zoo trains in fresh workdirs: pass another --root.")
  common = ["--config", entry.config, f"--compilation_cache={cache}", *_flags(overrides)]
  record = {"kind": "run", "name": entry.name, "family": entry.family, "label": entry.label,
            "config": entry.config, "overrides": overrides,
            "command": display_command(entry.config, overrides), "workdir": workdir}
  log = os.path.join(root, f"{entry.name}.log")
  rc, wall, rss = run_child([sys.executable, "main.py", f"--workdir={workdir}", *common], log)
  record.update(wall_s=round(wall, 1), peak_rss_mb=round(rss), device=_devices(log), log=log)
  if rc != 0:
    return {**record, **_failure(rc, log)}
  results = _read_results(workdir)
  (test, metrics), *more = results["test"].items()
  eval_s = round(_eval_seconds(results), 1)   # the shown train + eval add up to the wall time
  record.update(test_set=test, **_metrics(metrics), step=results.get("step"),
                eval_s=eval_s, train_s=round(record["wall_s"] - eval_s, 1))
  if "rows" in metrics:
    record["rows"] = {row: _metrics(m) for row, m in metrics["rows"].items()}
  if more:
    record["more_tests"] = {name: _metrics(m) for name, m in more}
  if "stage1" in results:
    record["stage1"] = _metrics(results["stage1"]["test"][test])
  if isinstance(results.get("seconds"), dict):
    record["seconds"] = results["seconds"]
  if entry.post_eval:
    record["post"] = post_evaluate(entry, workdir, common, root)
  untrained_dir = workdir + "-untrained"
  log = os.path.join(root, f"{entry.name}-untrained.log")
  rc, wall, rss = run_child([sys.executable, "bench/zoo_untrained.py",
                             f"--workdir={untrained_dir}", *common], log)
  untrained = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss), "log": log}
  if rc != 0:
    untrained.update(_failure(rc, log))
  else:
    u = _read_results(untrained_dir)["test"][test]
    untrained.update(**_metrics(u), eval_s=round(u.get("seconds", 0.0), 1))
  record["untrained"] = untrained
  return record


def machine(argv: list[str], root: str, cache: str, smoke: bool) -> dict:
  """The invocation's record: date, CPU, load, JAX and its devices (asked in a child, so this
  process never holds an accelerator its children need), commit and whether the tree was dirty."""
  probe = subprocess.run(
      [sys.executable, "-c", "import json, jax, jaxlib; d = jax.devices(); print(json.dumps({"
       "'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'backend': jax.default_backend(),"
       " 'device_kind': d[0].device_kind, 'device_count': len(d)}))"],
      cwd=REPO, capture_output=True, text=True, check=True)
  return {"kind": "machine", "run": time.strftime("%Y-%m-%d %H:%M:%S"),
          "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(),
          "cores": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()],
          "load_after": None, "python": platform.python_version(),
          **json.loads(probe.stdout.strip().splitlines()[-1]), **git_state(), "argv": argv,
          "root": root,
          "compilation_cache": cache or None, "smoke": smoke}


def write(out: str, kept: list[dict], records: list[dict]) -> None:
  """Rewrites `out` (atomically): the kept earlier lines, then this invocation's records."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    for r in kept + records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, out)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=DEFAULT_OUT, help="JSON lines to write (default %(default)s)")
  p.add_argument("--append", action="store_true", help="keep --out's earlier lines (the render "
                 "takes each entry's last record)")
  p.add_argument("--only", default="", help="comma-separated entries (default all: "
                 + ", ".join(entry_names()) + ")")
  p.add_argument("--root", default=None, help="folder of the workdirs and logs (default: a new "
                 "temporary folder, kept)")
  p.add_argument("--smoke", action="store_true", help="tiny models, one epoch: checks the "
                 "pipeline (records marked smoke)")
  p.add_argument("--override", nargs="+", default=[], metavar="FIELD=VALUE",
                 help="config overrides for every entry, e.g. dataset.data_dir=/data/tfds")
  p.add_argument("--compilation-cache", default="", help="XLA cache folder for the children "
                 "(default: none, so times include compiling)")
  p.add_argument("--list", action="store_true", help="print the entries' commands and exit")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  names = [n for n in args.only.split(",") if n] or entry_names()
  unknown = sorted(set(names) - set(entry_names()))
  if unknown:
    print(f"error: unknown entries {unknown}; choose from {entry_names()}", file=sys.stderr)
    return 2
  bad = [o for o in args.override if "=" not in o]
  if bad:
    print(f"error: --override takes FIELD=VALUE, got {bad}", file=sys.stderr)
    return 2
  extra = dict(o.split("=", 1) for o in args.override)
  entries = [e for e in ENTRIES if e.name in names]
  if args.list:
    for e in entries:
      print(f"{e.name}: {display_command(e.config, overrides_of(e, args.smoke, extra))}")
    return 0
  root = args.root or tempfile.mkdtemp(prefix="jaxreid-zoo-")
  os.makedirs(root, exist_ok=True)
  kept = []
  if args.append and os.path.exists(args.out):
    with open(args.out) as f:
      kept = [json.loads(line) for line in f if line.strip()]
  cache = os.path.expanduser(args.compilation_cache)
  host = machine(list(sys.argv[1:] if argv is None else argv), root, cache, args.smoke)
  records, failed = [host], []
  for e in entries:
    print(f"{e.name}: {display_command(e.config, overrides_of(e, args.smoke, extra))}",
          flush=True)
    record = run_entry(e, root, overrides_of(e, args.smoke, extra), cache)
    record.update(run=host["run"], date=host["date"], commit=host["commit"], dirty=host["dirty"],
                  smoke=args.smoke)
    records.append(record)
    host["load_after"] = [round(x, 2) for x in os.getloadavg()]
    write(args.out, kept, records)
    failed_part = next((part for part in (record, record.get("post", {}),
                                          record.get("untrained", {})) if "error" in part), None)
    if failed_part is not None:
      failed.append(e.name)
      where = failed_part["log"]
      print(f"  failed: see {where}", flush=True)
    else:
      print(f"  mAP {record['mAP']} (untrained {record['untrained']['mAP']}), "
            f"{record['wall_s']} s, peak RSS {record['peak_rss_mb']} MB", flush=True)
  print(f"wrote {args.out} (workdirs in {root}); render with python bench/readme_tables.py")
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
