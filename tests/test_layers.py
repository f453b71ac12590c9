"""The import layers of jaxreid hold: every module imported alone in a fresh interpreter imports
only modules of its own layer or below, no method imports another method, the import graph has
no cycle, and `import jaxreid` (the API) does not load the training stack."""
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import jaxreid

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: shared layers and io → backbones → models → train/eval → methods → registry →
# api/CLI (docs/architecture.md).
LAYERS = [
    ("io", ("jaxreid.weights", "jaxreid.parallel", "jaxreid.checkpoint", "jaxreid.viz",
            "jaxreid.nn", "jaxreid.data", "jaxreid.export")),
    ("backbones", ("jaxreid.backbones",)),
    ("models", ("jaxreid.models", "jaxreid.objectives", "jaxreid.official")),
    ("train/eval", ("jaxreid.train", "jaxreid.eval")),
    ("methods", ("jaxreid.methods",)),
    ("registry", ("jaxreid.registry",)),
    ("api", ("jaxreid.api", "jaxreid.cli", "jaxreid.tools", "jaxreid.config_help",
             "jaxreid.report")),
]
TRAINING_STACK = ("jaxreid.train", "jaxreid.data", "jaxreid.checkpoint", "orbax", "grain",
                  "tensorflow_datasets", "tensorboardX")


def layer_of(module: str) -> int:
  if module == "jaxreid":
    return 0        # the package itself resolves its exported names lazily, importing nothing
  best = None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if module == p or module.startswith(p + "."):
        if best is None or len(p) > best[1]:
          best = (i, len(p))
  if best is None:
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")
  return best[0]


def all_modules() -> list[str]:
  names = ["jaxreid"]
  for info in pkgutil.walk_packages(jaxreid.__path__, "jaxreid."):
    names.append(info.name)
  return sorted(names)


_PROBE = """
import importlib, json, sys
before = set(sys.modules)
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in set(sys.modules) - before)))
"""


def imported_by(module: str) -> list[str]:
  out = subprocess.run([sys.executable, "-c", _PROBE, module], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def direct_imports(module: str, top_level_only: bool = True) -> set[str]:
  """The jaxreid modules `module`'s source imports: at its top level, or anywhere (function
  bodies too) with top_level_only=False."""
  import ast
  import importlib.util
  path = importlib.util.find_spec(module).origin
  tree = ast.parse(Path(path).read_text())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("jaxreid")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxreid"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        found.add(full if _is_module(full) else node.module)
  found.discard(module)
  return found


def _is_module(name: str) -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, AttributeError, ValueError):
    return False


def method_of(module: str) -> str | None:
  parts = module.split(".")
  return parts[2] if len(parts) > 2 and parts[1] == "methods" else None


def test_every_module_imports_only_its_layer_or_below():
  """Every import statement (top level or in a function) points to the module's own layer or
  below, and no method imports another; then, by induction, so does everything it loads."""
  problems = []
  for module in all_modules():
    mine = layer_of(module)
    for dep in direct_imports(module, top_level_only=False):
      if layer_of(dep) > mine:
        problems.append(f"{module} ({LAYERS[mine][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
      if method_of(module) and method_of(dep) and method_of(dep) != method_of(module):
        problems.append(f"method {module} imports another method's {dep}")
  assert not problems, "\n".join(problems)


def test_a_module_alone_loads_only_its_layer_or_below():
  """The same, observed: what importing a method's package alone really loads."""
  for module in ("jaxreid.methods.transmatcher", "jaxreid.train.loop"):
    mine = layer_of(module)
    above = [dep for dep in imported_by(module)
             if dep.startswith("jaxreid") and layer_of(dep) > mine]
    assert not above, (module, above)


def test_import_graph_has_no_cycle():
  graph = {m: direct_imports(m) for m in all_modules()}
  state = {}

  def visit(node, path):
    state[node] = "open"
    for dep in graph.get(node, ()):
      if dep not in graph:
        continue
      if state.get(dep) == "open":
        raise AssertionError("import cycle: " + " -> ".join(path + [dep]))
      if dep not in state:
        visit(dep, path + [dep])
    state[node] = "done"

  for m in graph:
    if m not in state:
      visit(m, [m])


def test_the_api_does_not_load_the_training_stack():
  assert [m for m in imported_by("jaxreid") if m.startswith("jaxreid")] == ["jaxreid"]
  loaded = imported_by("jaxreid.api")
  heavy = [m for m in loaded if m.startswith(TRAINING_STACK)]
  assert not heavy, heavy
  assert "jaxreid.registry" in loaded


@pytest.mark.parametrize("module", ["jaxreid.methods.qaconv", "jaxreid.registry"])
def test_the_checker_sees_real_imports(module):
  """Guards the test itself: the probe does see what a module imports."""
  assert any(m.startswith("jaxreid.models") for m in imported_by(module))
  assert direct_imports(module)
