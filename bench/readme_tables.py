"""The README's measured tables, rendered from the result files in bench/results/ (never typed by
hand): each generated block of README.md sits between `<!-- generated:NAME -->` and
`<!-- end:NAME -->`, and tests/test_readme_tables.py fails when a block differs from its render.

  python bench/readme_tables.py            # rewrite the blocks of README.md
  python bench/readme_tables.py --check    # exit 1 when README.md is out of date

Blocks: `input_pipeline` from bench/results/input_pipeline.jsonl (bench/bench_input_pipeline.py
--out …).
"""
import argparse
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


BLOCKS = {"input_pipeline": input_pipeline}


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
  text = readme.read_text()
  new = render(text)
  if args.check:
    if new != text:
      print("README.md's generated blocks are out of date: run python bench/readme_tables.py")
      return 1
    return 0
  readme.write_text(new)
  return 0


if __name__ == "__main__":
  sys.exit(main())
