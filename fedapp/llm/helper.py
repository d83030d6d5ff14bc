"""Run a fedapp module in a short-lived helper process, so that what it imports and
allocates (datasets, a full-precision checkpoint) never enters the calling process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_helper(module: str, args: list[str], what: str) -> None:
    """`python -m module *args` with this checkout on the path; RuntimeError naming `what`
    and the helper's last error line if it fails."""
    root = str(Path(__file__).resolve().parents[2])  # where fedapp/ and strategies/ live
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    out = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"{what} failed: "
                           + (lines[-1] if lines else f"exit status {out.returncode}"))
