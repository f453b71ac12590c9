"""The table a train/eval run ends with (jaxreid.report): one line per computed row of each
test set, as the evaluator and NFormer's pipeline lay out their results, and the run's files."""
import re

from jaxreid import report


def metrics(base: float) -> dict:
  return {"R1": base, "R5": base + 1, "R10": base + 2, "R20": base + 3, "mAP": base - 10,
          "mINP": base - 20, "num_queries": 7, "seconds": 1.5}


def parse(table: str) -> dict[str, dict[str, list[float]]]:
  """{test set: {row label: [R1, R5, R10, mAP, mINP]}} read back from the printed table."""
  out, current = {}, None
  for line in table.splitlines():
    if not line.strip() or set(line) == {"-"} or line.startswith("note:"):
      continue
    cells = line.split()
    if cells[-5:] == list(report.COLUMNS):
      current = out.setdefault(" ".join(cells[:-5]), {})
      continue
    values = cells[-5:]
    current[" ".join(cells[:-5])] = [float(v) for v in values]
  return out


def test_plain_only_and_post_processed_rows():
  rows = {"plain": metrics(50), "+TLift": metrics(60), "+RR": metrics(70),
          "+RR+TLift": metrics(80)}
  results = {"test": {"market": {**metrics(50), "rows": rows},
                      "duke": {**metrics(40), "notes": ["TLift skipped: no times."]}},
             "paper": {}, "step": 12}
  table = report.results_table(results)
  parsed = parse(table)
  assert list(parsed) == ["market", "duke"]
  assert list(parsed["market"]) == ["plain", "+TLift", "+RR", "+RR+TLift"]
  for label, want in rows.items():
    assert parsed["market"][label] == [want[c] for c in report.COLUMNS]
  assert parsed["duke"] == {"plain": [40, 41, 42, 30, 20]}
  assert "note: TLift skipped: no times." in table
  widths = {len(line) for line in table.split("\n\n")[0].splitlines()}
  assert len(widths) == 1       # aligned columns


def test_nformer_lists_stage1_then_refined_rows():
  results = {"test": {"market": {**metrics(90), "rows": {"plain": metrics(90),
                                                         "+RR": metrics(95)}}},
             "stage1": {"test": {"market": metrics(85)}, "step": 3}, "step": 4}
  parsed = parse(report.results_table(results))
  assert list(parsed["market"]) == ["stage 1 plain", "NFormer refined", "NFormer refined +RR"]
  assert parsed["market"]["NFormer refined +RR"][0] == 95
  assert parsed["market"]["stage 1 plain"][3] == 75


def test_missing_metric_is_a_dash():
  line = report.results_table({"test": {"x": {"R1": 1.0, "mAP": 2.0}}}).splitlines()[-1]
  assert re.fullmatch(r"plain\s+1\.00\s+-\s+-\s+2\.00\s+-", line)


def test_run_files_names_what_exists(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  (tmp_path / "best").mkdir()
  (tmp_path / "tensorboard").mkdir()
  text = report.run_files(str(tmp_path))
  assert f"results:          {tmp_path / 'results.json'}" in text
  assert str(tmp_path / "best") in text and str(tmp_path / "tensorboard") in text
  assert "retrieval" not in text and "--mode=visualize" in text
  (tmp_path / "visualize").mkdir()
  (tmp_path / "visualize" / "index.html").write_text("")
  assert str(tmp_path / "visualize" / "index.html") in report.run_files(str(tmp_path))
  assert report.run_files(str(tmp_path), "runs/a").splitlines()[0] == "evaluated:        runs/a"
