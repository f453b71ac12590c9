"""What the command line prints at the end of a train or eval run: a table of R1/R5/R10/mAP/mINP
per test set (one line per computed row: plain, +TLift, +RR, +RR+TLift; for NFormer the stage-1
rows, then the refined ones), and where the run's files are."""
import os

COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")


def _rows(entry: dict) -> dict[str, dict]:
  """{row name: metrics} of one test set's entry of results["test"] (evaluator.evaluate_matcher):
  its `rows` when post-processing ran, else its top-level (plain) metrics."""
  return entry.get("rows") or {"plain": entry}


def result_rows(results: dict) -> dict[str, list[tuple[str, dict]]]:
  """{test set: [(row label, metrics), …]} in the order they were computed. An NFormer run
  (results with "stage1") lists the stage-1 rows first, then the refined ones."""
  tables = {}
  stage1 = results.get("stage1", {}).get("test", {})
  for name, entry in results.get("test", {}).items():
    rows = []
    if name in stage1:
      rows += [(f"stage 1 {row}", m) for row, m in _rows(stage1[name]).items()]
      rows += [(f"NFormer refined {row}".replace(" plain", ""), m)
               for row, m in _rows(entry).items()]
    else:
      rows += list(_rows(entry).items())
    tables[name] = rows
  return tables


def results_table(results: dict) -> str:
  """The metrics of `results` (percent) as one aligned text table per test set."""
  blocks = []
  for name, rows in result_rows(results).items():
    width = max([len(label) for label, _ in rows] + [len(name)])
    header = f"{name:<{width}}" + "".join(f"{c:>8}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for label, metrics in rows:
      cells = "".join(f"{metrics[c]:>8.2f}" if isinstance(metrics.get(c), (int, float))
                      else f"{'-':>8}" for c in COLUMNS)
      lines.append(f"{label:<{width}}{cells}")
    for note in results["test"][name].get("notes", []):
      lines.append(f"note: {note}")
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def run_files(workdir: str, checkpoint: str | None = None) -> str:
  """Lines naming the run's results, checkpoints, TensorBoard log and pictures that exist in
  `workdir` (the pictures with how to draw them when there are none yet), after the evaluated
  `checkpoint` when it is given (--mode=eval of another folder or file)."""
  where = [("results", "results.json"), ("retrieval lists", "retrieval.npz"),
           ("best checkpoint", "best"), ("last checkpoints", "checkpoints"),
           ("NFormer stage 2", os.path.join("nformer", "best")),
           ("TensorBoard", "tensorboard"), ("training log", "train.log"),
           ("pictures", os.path.join("visualize", "index.html"))]
  found = [(what, os.path.join(workdir, path)) for what, path in where
           if os.path.exists(os.path.join(workdir, path))]
  lines = [f"{what + ':':<18}{path}" for what, path in found]
  if checkpoint is not None:
    lines.insert(0, f"{'evaluated:':<18}{checkpoint}")
  if any(what == "TensorBoard" for what, _ in found):
    lines.append(f"{'':<18}(tensorboard --logdir {os.path.join(workdir, 'tensorboard')})")
  if not os.path.exists(os.path.join(workdir, "visualize")):
    lines.append(f"{'pictures:':<18}none yet; draw them with --mode=visualize")
  return "\n".join(lines)
