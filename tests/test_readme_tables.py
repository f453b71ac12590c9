"""The README's generated blocks equal their render from bench/results/ (bench/readme_tables.py):
a number typed by hand, or a result file changed without re-rendering, fails here."""
import importlib.util

from conftest import ROOT


def _tables():
  spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench/readme_tables.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_readme_blocks_are_rendered_from_the_result_files():
  tables = _tables()
  text = (ROOT / "README.md").read_text()
  assert tables.render(text) == text, "run python bench/readme_tables.py"


def test_a_hand_edit_is_caught():
  tables = _tables()
  text = (ROOT / "README.md").read_text()
  start = text.index("<!-- generated:input_pipeline -->")
  edited = text[:start] + text[start:].replace("| **", "| **9", 1)
  assert edited != text and tables.render(edited) == text
