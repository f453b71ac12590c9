"""What every benchmark shares: each implementation runs in a child process of its own (so peak
RSS is its own), times its call, and hands its output back through a .npy file."""
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
  """The CPU's model name (from /proc/cpuinfo; platform.processor() where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def git_state() -> dict:
  """{"commit": the short HEAD hash ('' outside a checkout), "dirty": whether the tree has
  uncommitted changes} of this repository."""
  def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
  return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def peak_rss_mb() -> float:
  """This process's peak resident set size so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(run, repeats: int):
  """(last output, first call's seconds, best of `repeats` further calls' seconds — the first
  call's when repeats is 0)."""
  t0 = time.perf_counter()
  out = run()
  first = time.perf_counter() - t0
  walls = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = run()
    walls.append(time.perf_counter() - t0)
  return out, first, min(walls) if walls else first


def run_impl(script: str, argv: list[str], impl: str, tmp: str, *extra: str):
  """Runs `script argv --impl impl --out F extra` in a child; prints and returns its last JSON
  line and the array it saved to F (None when it saved none, e.g. out of memory). A child killed
  before printing gives a record with its return code and stderr tail."""
  out = os.path.join(tmp, f"{impl}{'_'.join(('',) + extra)}.npy")
  proc = subprocess.run([sys.executable, script, *argv, "--impl", impl, "--out", out, *extra],
                        capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()
  record = (json.loads(lines[-1]) if lines else
            {"impl": impl, "status": f"died (rc {proc.returncode})", "stderr": proc.stderr[-300:]})
  print(json.dumps(record), flush=True)
  return record, (np.load(out) if os.path.exists(out) else None)
