"""Reads the official parameter-shape files in tests/data (copied from shared/reference)."""
from pathlib import Path

DATA = Path(__file__).parent / "data"


def official_shapes(path) -> dict[str, dict[str, tuple]]:
  """Section → key → shape of a keys file ('## section' headers, 'key (shape)' lines)."""
  sections, current = {}, None
  for line in Path(path).read_text().splitlines():
    if line.startswith("## "):
      current = sections.setdefault(line[3:].split("(")[0].strip(), {})
    elif line.strip():
      key, shape = line.split(" ", 1)
      current[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
  return sections
