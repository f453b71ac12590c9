"""`jaxreid --help` / `python main.py --help`: every flag of the command line with its help, the
modes and two examples (absl's own --help showed one usage line)."""
import subprocess
import sys
from pathlib import Path

from absl import flags

from jaxreid import cli

ROOT = Path(__file__).resolve().parents[1]


def cli_flags() -> dict[str, flags.Flag]:
  return {f.name: f for f in flags.FLAGS.get_flags_for_module(cli)}


def test_help_lists_every_flag_mode_and_two_examples():
  out = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  text = out.stdout
  assert {"config", "mode", "workdir", "checkpoint", "output", "top_k"} <= set(cli_flags())
  for name, flag in cli_flags().items():
    shown = f"--[no]{name}:" if flag.boolean else f"--{name}:"
    assert shown in text, name
    first_words = " ".join(flag.help.split()[:3])
    assert first_words in " ".join(text.split()), (name, first_words)
  modes = text.split("modes (--mode):", 1)[1].split("examples:", 1)[0]
  listed = [line.split()[0] for line in modes.splitlines() if line.startswith("  ") and
            not line.startswith("   ")]
  assert listed == flags.FLAGS["mode"].parser.enum_values == list(cli.MODES)
  examples = text.split("examples:", 1)[1].split("flags:", 1)[0]
  assert sum(line.strip().startswith("jaxreid --config") for line in examples.splitlines()) == 2
  assert "--helpfull" not in text


def test_short_help_flags_print_the_same_text():
  assert cli.help_text().startswith("usage: jaxreid --config")
  for flag in ("-h", "--helpshort"):
    out = subprocess.run([sys.executable, "-c", "import sys; from jaxreid.cli import run; "
                          f"sys.argv = ['jaxreid', '{flag}']; run()"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == cli.help_text(), (flag, out.stderr[-1000:])
