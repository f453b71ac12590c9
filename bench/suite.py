"""Runs the whole test suite as the README says (`python -m pytest -q tests`) and appends its
size, outcome and wall time to bench/results/test_suite.jsonl, from which bench/readme_tables.py
renders the README's test-suite sentence.

  python bench/suite.py        # exit status: pytest's
"""
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # also when loaded by path
from harness import cpu_name, git_state  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "test_suite.jsonl"


def junit_counts(path: str) -> dict:
  """tests / failures / errors / skipped of a pytest JUnit XML file."""
  root = ElementTree.parse(path).getroot()
  suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
  return {k: sum(int(s.get(k, 0)) for s in suites)
          for k in ("tests", "failures", "errors", "skipped")}


def main() -> int:
  record = {"kind": "suite", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "python": platform.python_version(), **git_state()}
  with tempfile.TemporaryDirectory() as tmp:
    xml = os.path.join(tmp, "junit.xml")
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests", f"--junitxml={xml}"],
                        cwd=REPO).returncode
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    if not os.path.exists(xml):
      print(f"pytest wrote no report (exit status {rc}); nothing recorded", file=sys.stderr)
      return rc or 1
    record.update(junit_counts(xml), exit_status=rc)
  OUT.parent.mkdir(parents=True, exist_ok=True)
  with open(OUT, "a") as f:
    f.write(json.dumps(record) + "\n")
  print(f"recorded in {OUT.relative_to(REPO)}; render with python bench/readme_tables.py")
  return rc


if __name__ == "__main__":
  sys.exit(main())
