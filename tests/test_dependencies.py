"""Every package the project's code imports is a declared dependency: module-level imports in
requirements.txt and pyproject.toml's dependencies, imports inside functions (optional, like
torch for converting .pth files) at least in requirements-dev.txt and pyproject's dev extra."""
import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"jaxreid", "configs", "tfds_builders", "main"}


def _names(requirement_lines) -> set[str]:
  names = set()
  for line in requirement_lines:
    line = line.split("#")[0].strip()
    if line and not line.startswith("-"):
      names.add(_normalise(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
  return names


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _imports() -> dict[str, bool]:
  """{top-level module: imported at module level somewhere} over the project's code."""
  found = {}
  files = [ROOT / "main.py"] + [p for d in ("jaxreid", "configs", "tfds_builders")
                                for p in (ROOT / d).rglob("*.py")]
  for path in files:
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        modules = [node.module]
      else:
        continue
      for module in modules:
        top = module.split(".")[0]
        if top not in sys.stdlib_module_names and top not in OURS:
          found[top] = found.get(top, False) or id(node) in top_level
  return found


def test_every_imported_package_is_declared():
  distributions = importlib.metadata.packages_distributions()
  required = _names((ROOT / "requirements.txt").read_text().splitlines())
  dev = required | _names((ROOT / "requirements-dev.txt").read_text().splitlines())
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  declared = _names(project["dependencies"])
  declared_dev = declared | _names(project["optional-dependencies"]["dev"])
  imports = _imports()
  assert {"jax", "numpy", "grain", "absl"} <= set(imports)   # the scan sees the code
  missing = []
  for module, at_module_level in sorted(imports.items()):
    names = {_normalise(d) for d in distributions.get(module, [module])}
    need, need_project = (required, declared) if at_module_level else (dev, declared_dev)
    if not names & need:
      missing.append(f"{module} ({', '.join(sorted(names))}) not in requirements"
                     f"{'' if at_module_level else '(-dev)'}.txt")
    if not names & need_project:
      missing.append(f"{module} ({', '.join(sorted(names))}) not in pyproject.toml")
  assert not missing, "; ".join(missing)


def _pins(lines) -> dict[str, str]:
  """{normalised name: version specifier} of requirement lines."""
  pins = {}
  for line in lines:
    line = line.split("#")[0].strip()
    if line and not line.startswith("-"):
      name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
      pins[_normalise(name)] = spec.replace(" ", "")
  return pins


def test_dev_extra_pins_as_requirements_dev():
  """`pip install -e .[dev]` and `pip install -r requirements-dev.txt` install the same test
  dependencies (the dev extra once allowed any torch ≥ 2.4 where requirements-dev pins one)."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extra = _pins(project["optional-dependencies"]["dev"])
  dev_file = _pins((ROOT / "requirements-dev.txt").read_text().splitlines())
  assert extra == dev_file, (extra, dev_file)
