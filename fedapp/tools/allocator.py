"""The memory allocator the app's processes start with: jemalloc where one is installed.

A training step allocates and frees about 2.8 GiB in blocks of 0.1-30 MiB (SmolLM2-135M,
batch 4, seq 128; measured with torch's profiler). glibc's malloc serves them from heaps
that fragment: the 4-bit client's heap reached 969 MiB with 150 MiB of it in use between
steps, and its peak RSS was 1.4x its live data. Returning freed blocks at once
(`train.release_memory`) fixes the memory but faults every block in again (1.97x the time
per step). jemalloc keeps freed pages for reuse in size classes and returns them after a
delay: measured by `scripts/bench_client.py` (same run, both allocators) it cuts the 4-bit
client's peak by about 30 % at no cost in time.

A process chooses its allocator when it starts, so this is the launchers' business:
`allocator_env` adds `LD_PRELOAD` for it to the environment of the processes the app's tools
start (`flower_env`: `flwr run`, the SuperLink, the SuperNodes, Ray's workers inherit it), and
`scripts/flwr_env.sh` does the same for the shell scripts through this module's CLI.

`FEDAPP_ALLOCATOR` picks: `jemalloc` (the default: Ray's bundled copy, which every
simulation install has, else the system's libjemalloc.so.2, else glibc with a logged
warning), `system` (glibc's malloc), or the path of a malloc library to preload. Linux
only; elsewhere nothing is preloaded. Each client reports the allocator it ran on (metric `jemalloc`).

    python -m fedapp.tools.allocator --shell     # the export line flwr_env.sh evaluates
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shlex
import sys
from pathlib import Path

VARIABLE = "FEDAPP_ALLOCATOR"
CHOICES = ("jemalloc", "system")
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
               "/usr/lib", "/usr/local/lib")


def jemalloc_library() -> Path | None:
    """A jemalloc shared library on this machine: Ray's bundled copy (found without importing
    Ray), else the system's; None where there is none."""
    spec = importlib.util.find_spec("ray")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "core" / "libjemalloc.so"
        if bundled.is_file():
            return bundled
    for folder in SYSTEM_DIRS:
        found = Path(folder) / "libjemalloc.so.2"
        if found.is_file():
            return found
    return None


def chosen_library(choice: str) -> Path | None:
    """The library `choice` (a `FEDAPP_ALLOCATOR` value) preloads; None for glibc.
    ValueError for a value that is neither a choice nor an existing file."""
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice == "jemalloc":
        return jemalloc_library()
    path = Path(choice)
    if not path.is_file():
        raise ValueError(f"{VARIABLE}={choice!r}: allowed are {list(CHOICES)} or the path of "
                         "an existing malloc library")
    return path.resolve()


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the chosen allocator preloaded (`LD_PRELOAD`, ahead of what it held) and
    `FEDAPP_ALLOCATOR` set to what was chosen, so that a process started from it, and the
    processes those start, run on it."""
    choice = env.get(VARIABLE, "jemalloc")
    library = chosen_library(choice)
    out = dict(env)
    preload = [p for p in out.get("LD_PRELOAD", "").split(":") if p]
    if library is None:  # glibc: a jemalloc preloaded upstream (flwr_env.sh) is taken out
        preload = [p for p in preload if "jemalloc" not in Path(p).name]
        if preload:
            out["LD_PRELOAD"] = ":".join(preload)
        else:
            out.pop("LD_PRELOAD", None)
        if choice == "jemalloc" and sys.platform.startswith("linux"):
            logging.getLogger(__name__).warning(
                "no jemalloc found (Ray's bundled copy or libjemalloc.so.2): glibc's malloc, "
                "whose fragmentation costs peak memory")
        out[VARIABLE] = "system"
        return out
    if str(library) not in preload:
        out["LD_PRELOAD"] = ":".join([str(library), *preload])
    out[VARIABLE] = str(library)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shell", action="store_true",
                        help="print the export line of the variables that choose it")
    args = parser.parse_args()
    try:
        env = allocator_env(dict(os.environ))
    except ValueError as error:
        sys.exit(str(error))
    if args.shell:
        names = [n for n in ("LD_PRELOAD", VARIABLE) if n in env]
        print("export " + " ".join(f"{n}={shlex.quote(env[n])}" for n in names))
    else:
        print(env[VARIABLE])


if __name__ == "__main__":
    main()
