"""The README's measured tables and docs/results.md, rendered from the result files in
bench/results/ (never typed by hand): each generated block of README.md sits between
`<!-- generated:NAME -->` and `<!-- end:NAME -->`, docs/results.md is generated whole, and
tests/test_readme_tables.py fails when either differs from its render.

  python bench/readme_tables.py            # rewrite the blocks of README.md and docs/results.md
  python bench/readme_tables.py --check    # exit 1 when either is out of date

Blocks: `input_pipeline` from bench/results/input_pipeline.jsonl (bench/bench_input_pipeline.py
--out …); `test_suite` from bench/results/test_suite.jsonl (bench/suite.py); `quickstart` (the
transmatcher entry), `postprocessing` (the qaconv_gs entry's post-evaluation), `zoo_qaconv`,
`zoo_transmatcher`, `zoo_kpm`, `zoo_nformer`, `zoo_pat` and docs/results.md from bench/results/zoo.jsonl (bench/zoo.py --out …), each entry's last record.
"""
import argparse
import importlib.util
import json
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TRANSFORMS = ("pad_crop", "flip", "rotate", "color_jitter", "occlusion", "random_erasing")


def _records(name: str) -> list[dict]:
  path = RESULTS / f"{name}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _n(value: float) -> str:
  return f"{value:,.0f}"


def input_pipeline() -> str:
  records = _records("input_pipeline")
  machine = next(r for r in records if r["kind"] == "machine")
  settings = list(dict.fromkeys(r["setting"] for r in records if r["kind"] == "per_core"))
  rate = {(r["setting"], r["stage"]): r["images_per_s"] for r in records
          if r["kind"] == "per_core"}
  size = {r["setting"]: r["input"] for r in records if r["kind"] == "per_core"}
  in_step = {(r["setting"], r["transform"]): r["us_per_image_wall"] for r in records
             if r["kind"] == "in_step"}
  step = {r["setting"]: r for r in records if r["kind"] == "step"}
  lines = [
      f"Measured {machine['date']} on {machine['cpu']} ({machine['cores']} cores), Pillow "
      f"{machine['pillow']}, JAX {machine['jax']} ({machine['backend']}), commit "
      f"{machine['commit']}: `python bench/bench_input_pipeline.py --out "
      "bench/results/input_pipeline.jsonl` (a Market-1501 stand-in of 128×64 JPEGs read through "
      "its TFDS builder). Images/s per core is process CPU time of one thread.",
      "",
      "| setting | input | transforms | before: Pillow, per image (images/s per core) | now: host "
      "part — decode, resize, factor draws (images/s per core) | decode alone | in the step: "
      "µs per image on this CPU | share of the setting's training step on this CPU |",
      "|---|---|---|---|---|---|---|---|"]
  for s in settings:
    transforms = [t.replace("_", " ") for t in TRANSFORMS if (s, f"pillow_{t}") in rate]
    share = "—"
    if s in step and (s, "all") in in_step:
      share = f"{100 * in_step[(s, 'all')] / 1e6 / step[s]['s_per_image']:.2g} %"
    lines.append(
        f"| `{s}` | {size[s][0]}×{size[s][1]} | {', '.join(transforms)} | "
        f"{_n(rate[(s, 'pillow_pipeline')])} | **{_n(rate[(s, 'host_pipeline')])}** | "
        f"{_n(rate[(s, 'decode')])} | {_n(in_step.get((s, 'all'), 0))} | {share} |")
  lines += ["", "Per transform, images/s per core in Pillow (before) and µs per image inside "
            "the jitted step on this CPU (now):", "",
            "| setting | resize | " + " | ".join(t.replace("_", " ") for t in TRANSFORMS)
            + " | in step: geometry / colour jitter / boxes |",
            "|---|---|" + "---|" * len(TRANSFORMS) + "---|"]
  for s in settings:
    cells = [_n(rate[(s, f"pillow_{t}")]) if (s, f"pillow_{t}") in rate else "off"
             for t in TRANSFORMS]
    moved = " / ".join(f"{in_step[(s, g)]:,.0f}" if (s, g) in in_step else "—"
                       for g in ("geometry", "color_jitter", "boxes"))
    lines.append(f"| `{s}` | {_n(rate[(s, 'resize')])} | " + " | ".join(cells) + f" | {moved} |")
  scaling = [r for r in records if r["kind"] == "scaling"]
  if scaling:
    counts = sorted({r["count"] for r in scaling})
    lines += ["", f"Host part of `{scaling[0]['setting']}` over the cores (wall clock, images/s; "
              "workers run one thread each):", "",
              "| | " + " | ".join(str(c) for c in counts) + " |",
              "|---|" + "---|" * len(counts)]
    for mode in ("threads", "workers"):
      by = {r["count"]: r["images_per_s"] for r in scaling if r["mode"] == mode}
      lines.append(f"| grain {mode} | " + " | ".join(_n(by[c]) if c in by else "—"
                                                    for c in counts) + " |")
  if step:
    lines += ["", "What the training step consumes on this CPU (random weights, batch "
              f"{next(iter(step.values()))['batch']}, augmentation included): "
              + "; ".join(f"`{s}` {r['images_per_s']:.2f} images/s" for s, r in step.items())
              + "."]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The synthetic model zoo (bench/zoo.py)


def _zoo():
  """bench/zoo.py as a module: its entries and families (it imports no jax)."""
  spec = importlib.util.spec_from_file_location("zoo", REPO / "bench" / "zoo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def zoo_records(path: pathlib.Path | None = None) -> tuple[dict, dict]:
  """({run id: machine record}, {entry name: its last run record}) of bench/results/zoo.jsonl
  (empty when the file does not exist yet)."""
  path = path or RESULTS / "zoo.jsonl"
  records = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
             if path.exists() else [])
  machines = {r["run"]: r for r in records if r["kind"] == "machine"}
  runs = {r["name"]: r for r in records if r["kind"] == "run"}
  return machines, runs


def _time(seconds) -> str:
  if seconds is None:
    return "—"
  seconds = round(seconds)
  return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def _pct(value, bold=False) -> str:
  if value is None:
    return "—"
  return f"**{value:.2f}**" if bold else f"{value:.2f}"


def _mb(value) -> str:
  return "—" if value is None else f"{value:,.0f} MB"


def _flags(record: dict) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in record.get("overrides", {}).items())


def _what(entry, record: dict | None) -> str:
  """The row's first cell: what it is and its config (with the overrides of the run)."""
  config = f"`{entry.config}`" if record is None or not record.get("overrides") else (
      f"`{entry.config} {_flags(record)}`")
  smoke = " — **smoke run, not a result**" if record is not None and record.get("smoke") else ""
  return f"{entry.label}: {config}{smoke}"


def _machine_sentence(machine: dict) -> str:
  load = (f"load average {machine['load_before'][0]:.1f} before, "
          f"{machine['load_after'][0]:.1f} after" if machine.get("load_after") else
          f"load average {machine['load_before'][0]:.1f} before")
  device = (f"{machine['device_count']}× {machine['device_kind']}"
            if machine["backend"] != "cpu" else "on the CPU")
  dirty = " with uncommitted changes" if machine["dirty"] else ""
  cache = ("with an XLA compilation cache, so times may leave out compiling"
           if machine.get("compilation_cache") else "no XLA cache, so times include compiling")
  return (f"{machine['date']} on {machine['cpu']} ({machine['cores']} cores, {load}), JAX "
          f"{machine['jax']} {device}, commit {machine['commit']}{dirty}; {cache}")


def _measured(runs: list[dict], machines: dict) -> str:
  """Where and when the rows of a table were measured: one sentence per zoo invocation."""
  by_run = {}
  for r in runs:
    by_run.setdefault(r["run"], []).append(r["name"])
  if not by_run:
    return ("Not measured yet: `python bench/zoo.py --out bench/results/zoo.jsonl`, then "
            "`python bench/readme_tables.py` (bench/README.md).")
  parts = []
  for run, names in by_run.items():
    where = _machine_sentence(machines[run]) if run in machines else f"run {run}"
    parts.append(where if len(by_run) == 1 else f"{', '.join(names)}: {where}")
  return "Measured by `python bench/zoo.py`, " + "; ".join(parts) + "."


def _sub_rows(record: dict) -> list[tuple[str, dict]]:
  """(label, metrics) of the record's further rows: NFormer's stage 1, post-processing rows."""
  rows = []
  if "stage1" in record:
    rows.append(("stage 1 of the same run", record["stage1"]))
  for row, metrics in record.get("rows", {}).items():
    if row != "plain":
      rows.append((f"the same run, {row}", metrics))
  return rows


def zoo_table(names: list[str], machines: dict, runs: dict) -> str:
  """A README table of the zoo entries `names` (missing ones as "not run yet")."""
  entries = {e.name: e for e in _zoo().ENTRIES}
  measured = [runs[n] for n in names if n in runs]
  lines = [_measured(measured, machines) + " [docs/results.md](docs/results.md) has every "
           "column: the test set, eval time, peak memory, device and commit of each run.", "",
           "| | R1 | R5 | R10 | mAP | mINP | untrained mAP | wall time (train + eval) |",
           "|---|---|---|---|---|---|---|---|"]
  for name in names:
    entry, r = entries[name], runs.get(name)
    if r is None or "error" in r:
      status = "not run yet" if r is None else f"failed ({r['error']})"
      lines.append(f"| {_what(entry, r)} | {status} | — | — | — | — | — | — |")
      continue
    untrained = r.get("untrained", {}).get("mAP")
    lines.append(f"| {_what(entry, r)} | {_pct(r['R1'])} | {_pct(r['R5'])} | {_pct(r['R10'])} | "
                 f"{_pct(r['mAP'], bold=True)} | {_pct(r['mINP'])} | {_pct(untrained)} | "
                 f"{_time(r['wall_s'])} |")
    for label, m in _sub_rows(r):
      lines.append(f"| {label} | {_pct(m.get('R1'))} | {_pct(m.get('R5'))} | "
                   f"{_pct(m.get('R10'))} | {_pct(m.get('mAP'), bold=True)} | "
                   f"{_pct(m.get('mINP'))} | — | — |")
  return "\n".join(lines)


# The README's zoo tables: the entries each section compares.
ZOO_BLOCKS = {
    "zoo_qaconv": ["qaconv_gs", "qaconv"],
    "zoo_transmatcher": ["transmatcher", "qaconv_gs_4ep", "transformer_cross", "transformer_cat",
                         "vit", "vanilla_transformer", "transmatcher_raw",
                         "transformer_cross_raw", "transformer_cat_raw", "vit_raw",
                         "vanilla_transformer_raw"],
    "zoo_kpm": ["kpm", "kpm_normalized", "qaconv_gs_4ep", "transmatcher"],
    "zoo_nformer": ["embedding", "nformer"],
    "zoo_pat": ["pat", "embedding_pat_budget"],
}


def results_md(path: pathlib.Path | None = None) -> str:
  """docs/results.md: every zoo entry's last record, one table per method family."""
  zoo = _zoo()
  machines, runs = zoo_records(path)
  lines = [
      "# Results: the synthetic model zoo", "",
      "Generated by `python bench/readme_tables.py` from `bench/results/zoo.jsonl`, which "
      "`python bench/zoo.py` writes (bench/README.md); do not edit it by hand "
      "(`tests/test_readme_tables.py` checks it). The README's result tables are rendered from "
      "the same records.", "",
      "Every entry is a config on `synthetic_reid`, trained from scratch with its fixed seed in "
      "a fresh workdir by the command in its row, then evaluated on the config's test set (the "
      "first, where there are several). Columns: R1, R5, R10, mAP, mINP (%) from the run's "
      "`results.json`; *untrained mAP*: the model the training starts from (same seed, same "
      "evaluation; `bench/zoo_untrained.py`; for NFormer the stage-1 model without refinement); "
      "*eval*: the seconds `results.json` gives the evaluation (encoding, scoring, metrics, "
      "compiling included; NFormer: stage 1's and the refined one); *train*: the rest of the "
      "training command's wall time (start-up, data, training); *peak RSS*: the training "
      "process's peak resident memory; *device*: the devices the process saw.", ""]
  used = sorted({r["run"] for r in runs.values()})
  lines += ["## Runs", ""]
  if not used:
    lines += ["No runs recorded yet: `python bench/zoo.py --out bench/results/zoo.jsonl`, "
              "then `python bench/readme_tables.py`."]
  for run in used:
    names = ", ".join(n for n, r in runs.items() if r["run"] == run)
    m = machines.get(run)
    where = _machine_sentence(m) if m else "no machine record"
    smoke = " Smoke run (`--smoke`): tiny models, one epoch; not results." if m and m.get(
        "smoke") else ""
    lines += [f"- `{run}`: {where}. Entries: {names}.{smoke}"]
  lines.append("")
  for family, title in zoo.FAMILIES.items():
    lines += [f"## {title}", "",
              "| entry | test set | R1 | R5 | R10 | mAP | mINP | untrained mAP | train | eval | "
              "peak RSS | device | date | commit | command |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in zoo.ENTRIES:
      if entry.family != family:
        continue
      r = runs.get(entry.name)
      smoke = " (smoke)" if r is not None and r.get("smoke") else ""
      if r is None or "error" in r:
        status = "not run yet" if r is None else f"failed ({r['error']})"
        command = zoo.display_command(entry.config, entry.overrides)
        lines.append(f"| `{entry.name}`{smoke} | {status} |" + " — |" * 12 + f" `{command}` |")
        continue
      u = r.get("untrained", {})
      commit = r["commit"] + ("+" if r.get("dirty") else "")
      lines.append(
          f"| `{entry.name}`{smoke} | {r['test_set']} | {_pct(r['R1'])} | {_pct(r['R5'])} | "
          f"{_pct(r['R10'])} | {_pct(r['mAP'], bold=True)} | {_pct(r['mINP'])} | "
          f"{_pct(u.get('mAP'))} | {_time(r['train_s'])} | {_time(r['eval_s'])} | "
          f"{_mb(r['peak_rss_mb'])} | {r.get('device') or '—'} | {r['date']} | {commit} | "
          f"`{r['command']}` |")
      for label, m in _sub_rows(r):
        lines.append(f"| ↳ {label} | | {_pct(m.get('R1'))} | {_pct(m.get('R5'))} | "
                     f"{_pct(m.get('R10'))} | {_pct(m.get('mAP'), bold=True)} | "
                     f"{_pct(m.get('mINP'))} |" + " |" * 8)
    lines.append("")
    for entry in zoo.ENTRIES:
      r = runs.get(entry.name)
      if entry.family == family and r is not None and isinstance(r.get("seconds"), dict):
        parts = ", ".join(f"{k} {_time(v)}" for k, v in r["seconds"].items()
                          if isinstance(v, (int, float)))
        lines += [f"`{entry.name}`: {parts} (the run's own timing).", ""]
  lines.append("A `+` after the commit: the tree had uncommitted changes.")
  return "\n".join(lines) + "\n"


POST_ROWS = {"plain": "QAConv-GS", "+TLift": "+ TLift", "+RR": "+ RR", "+RR+TLift": "+ RR + TLift"}


def postprocessing() -> str:
  """The re-ranking / TLift table: the zoo's --mode=eval of its trained QAConv-GS run."""
  machines, runs = zoo_records()
  return postprocessing_table(runs.get("qaconv_gs"), machines)


def postprocessing_table(r: dict | None, machines: dict) -> str:
  post = (r or {}).get("post")
  if post is None or "error" in post:
    return ("Not measured yet: `python bench/zoo.py --only qaconv_gs --append`, then "
            "`python bench/readme_tables.py`.")
  lines = [f"{_measured([r], machines)} Command: `{post['command']}` on that run's checkpoint; "
           "*seconds*: the row's post-processing and metrics.", "",
           "| | R1 | R5 | R10 | mAP | mINP | seconds |", "|---|---|---|---|---|---|---|"]
  for row, m in post["rows"].items():
    lines.append(f"| {POST_ROWS.get(row, row)} | {_pct(m['R1'])} | {_pct(m['R5'])} | "
                 f"{_pct(m['R10'])} | {_pct(m['mAP'], bold=True)} | {_pct(m['mINP'])} | "
                 f"{m['seconds']:.2f} |")
  return "\n".join(lines)


def quickstart() -> str:
  """The quick start's time: the zoo's record of the command it shows (configs/transmatcher.py)."""
  machines, runs = zoo_records()
  r = runs.get("transmatcher")
  if r is None or "error" in r or r.get("smoke"):
    return "Its time is not measured yet (`python bench/zoo.py --only transmatcher`)."
  m = machines.get(r["run"], {})
  where = f"{m['cpu']}, {m['cores']} cores" if m else "the zoo's machine"
  return (f"It took {_time(r['wall_s'])} in the zoo's run of {r['date']} ({where}, no "
          f"download, compiling included: {_time(r['train_s'])} to train, {_time(r['eval_s'])} "
          f"to evaluate) and reached mAP {r['mAP']:.2f} on {r['test_set']} "
          f"([docs/results.md](docs/results.md)).")


def test_suite() -> str:
  """The test suite's size and time: the last record of `python bench/suite.py`."""
  records = _records("test_suite") if (RESULTS / "test_suite.jsonl").exists() else []
  if not records:
    return "Not timed yet: `python bench/suite.py` runs it and records its size and time."
  r = records[-1]
  bad = r["failures"] + r["errors"]
  outcome = "all passed" if not bad and not r["exit_status"] else (
      f"{r['tests'] - bad - r['skipped']} passed, {bad} failed")
  dirty = " with uncommitted changes" if r["dirty"] else ""
  return (f"Its last full run (`python bench/suite.py`, {r['date']}, commit {r['commit']}{dirty}): "
          f"{r['tests']} tests, {outcome}, in {_time(r['wall_s'])} on {r['cpu']} "
          f"({r['cores']} cores).")


BLOCKS = {"input_pipeline": input_pipeline, "quickstart": quickstart, "test_suite": test_suite,
          "postprocessing": postprocessing,
          **{name: (lambda names: lambda: zoo_table(names, *zoo_records()))(names)
             for name, names in ZOO_BLOCKS.items()}}
DOCS = {"docs/results.md": results_md}


def render(text: str) -> str:
  for name, make in BLOCKS.items():
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- end:{name} -->)", re.S)
    if not pattern.search(text):
      raise ValueError(f"README.md has no <!-- generated:{name} --> … <!-- end:{name} --> block.")
    text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
  return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--check", action="store_true")
  args = p.parse_args(argv)
  readme = REPO / "README.md"
  outputs = {readme: render(readme.read_text())}
  outputs.update({REPO / name: make() for name, make in DOCS.items()})
  stale = [path for path, new in outputs.items()
           if not path.exists() or path.read_text() != new]
  if args.check:
    for path in stale:
      print(f"{path.relative_to(REPO)} is out of date: run python bench/readme_tables.py")
    return 1 if stale else 0
  for path in stale:
    path.write_text(outputs[path])
  return 0


if __name__ == "__main__":
  sys.exit(main())
