"""jaxreid command line: `python main.py --config configs/transmatcher.py` (the same CLI as the
installed `jaxreid` command; see jaxreid/cli.py and README)."""
from jaxreid.cli import run

if __name__ == "__main__":
  run()
