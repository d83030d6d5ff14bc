"""What the benchmark scripts share: running one measurement in a fresh Python process."""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(script: str, *args: str) -> dict:
    """Run `script` with `args` in a fresh interpreter (clean peak RSS, cold caches) and
    return the JSON object its last stdout line holds; exit with its stderr if it failed."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        sys.exit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
