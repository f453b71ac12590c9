"""`python main.py` with a fault injected, for tests/test_faults*.py:
"No space left on device" at one write site: JAXREID_ENOSPC = checkpoint | results |
tensorboard | log, from the JAXREID_ENOSPC_AFTER-th write of that kind on (default 2);
SIGTERM sent to itself as the n-th checkpoint save begins, for each n of JAXREID_SIGTERM_AT_SAVES
(e.g. "2,3": the first signal at the second save, the second inside the save that follows)."""
import errno
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _failing(original, after: int):
  calls = [0]

  def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] >= after:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original(*args, **kwargs)
  return wrapper


def install(site: str, after: int) -> None:
  import logging

  import orbax.checkpoint as ocp
  import tensorboardX

  if site == "checkpoint":
    ocp.CheckpointManager.save = _failing(ocp.CheckpointManager.save, after)
  elif site == "results":        # the results file, as write_results writes it
    import pathlib
    write_text = pathlib.Path.write_text
    failing = _failing(write_text, after)
    pathlib.Path.write_text = lambda self, *a, **k: (
        failing(self, *a, **k) if self.name.startswith(".results.json") else
        write_text(self, *a, **k))
  elif site == "tensorboard":
    tensorboardX.SummaryWriter.add_scalar = _failing(tensorboardX.SummaryWriter.add_scalar, after)
    tensorboardX.SummaryWriter.close = _failing(tensorboardX.SummaryWriter.close, 1)
  elif site == "log":
    logging.FileHandler.flush = _failing(logging.FileHandler.flush, after)
  else:
    raise ValueError(f"unknown JAXREID_ENOSPC site {site!r}")


def signal_at_saves(saves: set[int]) -> None:
  import orbax.checkpoint as ocp
  original, calls = ocp.CheckpointManager.save, [0]

  def save(*args, **kwargs):
    calls[0] += 1
    if calls[0] in saves:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  ocp.CheckpointManager.save = save


if __name__ == "__main__":
  if "JAXREID_ENOSPC" in os.environ:
    install(os.environ["JAXREID_ENOSPC"], int(os.environ.get("JAXREID_ENOSPC_AFTER", "2")))
  if "JAXREID_SIGTERM_AT_SAVES" in os.environ:
    signal_at_saves({int(n) for n in os.environ["JAXREID_SIGTERM_AT_SAVES"].split(",")})
  from jaxreid.cli import run
  run()
