"""The README's generated blocks and docs/results.md equal their render from bench/results/
(bench/readme_tables.py): a number typed by hand, or a result file changed without re-rendering,
fails here."""
import importlib.util
import json
import re
import shutil

from conftest import ROOT


def _tables():
  spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench/readme_tables.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _bump_bold_number(text: str, start: int, end: int) -> str:
  """`text` with the first bold number (a table's mAP) in text[start:end] changed."""
  match = re.compile(r"\*\*\d").search(text, start, end)
  assert match, "no measured row to edit: bench/results/zoo.jsonl has no runs"
  i = match.start() + 2
  return text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]


def test_readme_blocks_are_rendered_from_the_result_files():
  tables = _tables()
  text = (ROOT / "README.md").read_text()
  assert tables.render(text) == text, "run python bench/readme_tables.py"


def test_docs_results_is_rendered_from_the_zoo_records():
  assert (ROOT / "docs/results.md").read_text() == _tables().results_md(), (
      "run python bench/readme_tables.py")


def test_a_hand_edit_is_caught():
  tables = _tables()
  text = (ROOT / "README.md").read_text()
  start = text.index("<!-- generated:input_pipeline -->")
  edited = text[:start] + text[start:].replace("| **", "| **9", 1)
  assert edited != text and tables.render(edited) == text
  # A number in a zoo table (the README's and docs/results.md's).
  edited = _bump_bold_number(text, text.index("<!-- generated:zoo_qaconv -->"),
                             text.index("<!-- end:zoo_pat -->"))
  assert edited != text and tables.render(edited) == text
  docs = (ROOT / "docs/results.md").read_text()
  edited = _bump_bold_number(docs, 0, len(docs))
  assert edited != docs and tables.results_md() == docs


def test_partial_and_failed_zoo_records_render(tmp_path):
  """While the zoo is being run, a missing entry renders as "not run yet", a failed one as
  failed, and the check still compares the whole render."""
  machine = {"kind": "machine", "run": "r1", "date": "2026-01-01", "cpu": "some CPU", "cores": 2,
             "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 1.0, 1.0], "jax": "0.0",
             "backend": "cpu", "device_kind": "cpu", "device_count": 1, "commit": "abc1234",
             "dirty": False, "compilation_cache": None, "smoke": False}
  failed = {"kind": "run", "run": "r1", "name": "kpm", "error": "exit status 1", "smoke": False,
            "overrides": {}}
  path = tmp_path / "zoo.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in (machine, failed)) + "\n")
  tables = _tables()
  docs = tables.results_md(path)
  assert "| `kpm` | failed (exit status 1) |" in docs and "| `pat` | not run yet |" in docs
  table = tables.zoo_table(["kpm", "pat"], *tables.zoo_records(path))
  assert "| failed (exit status 1) |" in table and "| not run yet |" in table
  assert "2026-01-01 on some CPU (2 cores, load average 1.0 before, 2.0 after)" in table


def test_suite_sentence_comes_from_the_suite_record(tmp_path, monkeypatch):
  """bench/suite.py's JUnit counts and the README sentence rendered from its last record."""
  spec = importlib.util.spec_from_file_location("suite", ROOT / "bench/suite.py")
  suite = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(suite)
  xml = tmp_path / "junit.xml"
  xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="12" '
                 'failures="2" errors="1" skipped="0" time="3.0"/></testsuites>')
  counts = suite.junit_counts(str(xml))
  assert counts == {"tests": 12, "failures": 2, "errors": 1, "skipped": 0}
  tables = _tables()
  monkeypatch.setattr(tables, "RESULTS", tmp_path)
  assert tables.test_suite().startswith("Not timed yet")
  base = {"kind": "suite", "date": "2026-01-02", "cpu": "some CPU", "cores": 2,
          "commit": "abc1234", "dirty": False, "wall_s": 1501.0}
  records = [dict(base, tests=9, failures=0, errors=0, skipped=0, exit_status=0),
             dict(base, **counts, exit_status=1)]
  (tmp_path / "test_suite.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  assert tables.test_suite() == (
      "Its last full run (`python bench/suite.py`, 2026-01-02, commit abc1234): 12 tests, "
      "9 passed, 3 failed, in 25 min 01 s on some CPU (2 cores).")
  # With that record beside the repository's other result files, a hand-typed count is caught.
  for name in ("input_pipeline.jsonl", "zoo.jsonl"):
    shutil.copy(ROOT / "bench" / "results" / name, tmp_path / name)
  text = tables.render((ROOT / "README.md").read_text())
  assert "12 tests, 9 passed, 3 failed" in text
  edited = text.replace("12 tests, 9 passed", "1 tests, 9 passed")
  assert edited != text and tables.render(edited) == text
