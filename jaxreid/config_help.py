"""What --mode=describe prints, usable from Python: a config file's `:setting` names
(config_settings), the comments of its fields (field_comments) and the resolved config with
them (describe)."""


def _config_sources(path) -> list:
  """The config file, then the shipped config modules it imports (configs.common, …)."""
  import ast
  from pathlib import Path
  from jaxreid.api import configs_dir
  order, todo = [], [Path(path).resolve()]
  while todo:
    current = todo.pop(0)
    if current in order or not current.is_file():
      continue
    order.append(current)
    for node in ast.walk(ast.parse(current.read_text())):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module == "configs":
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("configs."):
        names = [node.module.split(".", 1)[1]]
      elif isinstance(node, ast.Import):
        names = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("configs.")]
      todo += [(configs_dir() / f"{n}.py").resolve() for n in names]
  return order


def _dotted(target) -> str | None:
  import ast
  parts = []
  while isinstance(target, ast.Attribute):
    parts.append(target.attr)
    target = target.value
  return ".".join(reversed(parts)) if parts and isinstance(target, ast.Name) else None


def _comments_in(source: str) -> dict[str, str]:
  """Field → comment of the `c.a.b = …` assignments of one config file: the comment at the end
  of the assignment's lines, else the comment lines right above it."""
  import ast
  import io
  import tokenize
  comments, code = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      code.update(range(tok.start[0], tok.end[0] + 1))
  found = {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign):
      continue
    trailing = [comments[i] for i in range(node.lineno, node.end_lineno + 1)
                if i in comments and i in code]
    above, line = [], node.lineno - 1
    while line in comments and line not in code:
      above.insert(0, comments[line])
      line -= 1
    comment = " ".join(trailing or above)
    for target in node.targets:
      key = _dotted(target)
      if key and comment and not found.get(key):
        found[key] = comment
  return found


def field_comments(path) -> dict[str, str]:
  """Field ('model.neck') → its comment in the config file, or else in the shipped config
  modules it imports."""
  found = {}
  for source in _config_sources(path):
    for key, comment in _comments_in(source.read_text()).items():
      found.setdefault(key, comment)
  return found


def config_settings(path) -> list[str]:
  """The `:setting` names a config file accepts, default first: the strings its get_config (and
  the helpers of the config modules it imports) compare their arguments with or look up in a
  module-level table, and the words of its error for an unknown setting, kept when get_config
  accepts them."""
  import ast
  import re
  import importlib
  import inspect
  from pathlib import Path
  from jaxreid.api import load_config_module
  module = load_config_module(path)
  params = list(inspect.signature(module.get_config).parameters.values())
  candidates = [params[0].default] if params and isinstance(params[0].default, str) else []
  for source in _config_sources(path):
    owner = module if source == Path(path).resolve() else importlib.import_module(
        f"configs.{source.stem}")

    def strings(node):
      if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
      if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in strings(e)]
      value = getattr(owner, node.id, None) if isinstance(node, ast.Name) else None
      return [v for v in (value or ()) if isinstance(v, str)] if isinstance(
          value, (dict, list, tuple, set, frozenset)) else []

    for func in ast.walk(ast.parse(source.read_text())):
      if not isinstance(func, ast.FunctionDef):
        continue
      args = {a.arg for a in func.args.args}
      is_arg = lambda n: isinstance(n, ast.Name) and n.id in args
      for node in ast.walk(func):
        if isinstance(node, ast.Compare) and any(map(is_arg, [node.left, *node.comparators])):
          candidates += [s for n in [node.left, *node.comparators] for s in strings(n)]
        elif isinstance(node, ast.Subscript) and is_arg(node.slice):
          candidates += strings(node.value)
  try:  # and the names its error for an unknown setting lists
    module.get_config("\0")
  except Exception as e:  # noqa: BLE001 (any error message may name them)
    candidates += re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(e))
  settings = []
  for candidate in dict.fromkeys(candidates):
    try:
      module.get_config(candidate)
    except Exception:  # not a setting of this file
      continue
    settings.append(candidate)
  return settings


def _leaves(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def describe(config, spec: str) -> str:
  """--mode=describe: the config file's settings, then every field of the resolved `config`
  (overrides applied) as `field = value  # comment`, the comments read from the config source."""
  path, _, setting = spec.partition(":")
  comments = field_comments(path)
  settings = config_settings(path)
  lines = [f"{path}: settings {', '.join(settings)} (`--config {path}:<setting>`; "
           f"this is {setting or settings[0] if settings else 'the default'})", ""]
  groups = set()
  for key, value in _leaves(config.to_dict()):
    parts = key.split(".")
    for i in range(1, len(parts)):
      group = ".".join(parts[:i])
      if group not in groups:
        groups.add(group)
        if group in comments:
          lines.append(f"{group}:  # {comments[group]}")
    text = f"{key} = {value!r}"
    lines.append(f"{text}  # {comments[key]}" if key in comments else text)
  return "\n".join(lines)
