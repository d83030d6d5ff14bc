"""Process memory: what a client holds, and glibc's habit of holding on to what was freed.

A training step allocates and frees hundreds of MiB of activation-sized blocks. glibc's
malloc serves blocks above its mmap threshold with their own mappings and returns them on
free, but it raises that threshold (up to 32 MiB) every time such a block is freed; after a
few steps the activations come from the heap arenas instead, which keep freed memory.
Measured on SmolLM2 (scripts/bench_client.py): the 4-bit client's resident set after a
step stayed ≈1 GiB above its live data. Pinning the threshold (`mallopt`) keeps large blocks
returned to the system at once: the 4-bit client's peak fell from 1863 to 1281 MiB, but
every large block then costs fresh page faults and a step took 2.4x as long (1.55 vs
3.72 s), so it is an option (`train.release_memory`), for devices where memory decides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
from functools import cache
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


@cache
def return_freed_memory() -> bool:
    """Pin glibc's mmap threshold for this process (once); False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl, macOS: no mallopt; nothing to pin
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (or since `reset_peak`), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def rss_mb() -> float:
    """Resident memory now, in MiB (Linux; elsewhere the peak stands in)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else peak_rss_mb()


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux `clear_refs` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def import_bitsandbytes() -> None:
    """Import bitsandbytes with `torch.compile` declined, once per process.

    bitsandbytes (0.50) wraps some of its default-backend kernels in `torch.compile` at
    import; that call imports the compiler (dynamo, inductor and their dependencies), and
    each wrapper falls back to the plain function when compiling fails. Those kernels are
    not the ones that run here: 4-bit layers on CPU use bnb's native CPU kernels (even
    feature sizes), on CUDA its CUDA kernels, and optimizers are torch's. Declining the
    compile keeps the plain functions and the compiler's memory out of every client process
    (measured by scripts/bench_client.py, "imports"). Where bitsandbytes is missing this
    does nothing: loading a 4-bit model says what to install.
    """
    import sys

    if "bitsandbytes" in sys.modules:
        return
    import torch

    def decline(*args, **kwargs):
        raise RuntimeError("torch.compile declined while bitsandbytes is imported")

    compile_ = torch.compile
    torch.compile = decline
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    finally:
        torch.compile = compile_
