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
The app's launchers now start processes on jemalloc where one is installed
(`fedapp.tools.allocator`), which reuses freed pages without that fragmentation; there the
option sets jemalloc's decay delays to zero instead, with the same trade.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import sys
from functools import cache
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


@cache
def _libc() -> ctypes.CDLL:
    """The C library this process runs on (OSError where it cannot be loaded)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@cache
def allocator() -> str:
    """The malloc this process runs on: "jemalloc" where one was preloaded (see
    `fedapp.tools.allocator`), else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "jemalloc" in maps else "system"


@cache
def return_freed_memory() -> bool:
    """Return freed memory to the OS at once, for this process (once); False where this
    malloc has no such setting. glibc: pin its mmap threshold. jemalloc: no decay delay
    for dirty and muzzy pages, in every arena and in arenas made later."""
    if allocator() == "jemalloc":
        return _jemalloc_no_decay()
    try:
        return bool(_libc().mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl, macOS: no mallopt; nothing to pin
        return False


def _jemalloc_no_decay() -> bool:
    """Zero decay in arenas made from now on ("arenas.*") and in each existing one (those
    not yet initialised refuse, and get the new default when they are)."""
    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
    if mallctl is None:
        return False

    def write(name: str, value) -> bool:
        return mallctl(name.encode(), None, None, ctypes.byref(value), ctypes.sizeof(value)) == 0

    count, size = ctypes.c_uint(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    if mallctl(b"arenas.narenas", ctypes.byref(count), ctypes.byref(size), None, 0) != 0:
        return False
    zero, kinds = ctypes.c_ssize_t(0), ("dirty", "muzzy")
    done = all(write(f"arenas.{kind}_decay_ms", zero) for kind in kinds)
    written = [write(f"arena.{arena}.{kind}_decay_ms", zero)
               for arena in range(count.value) for kind in kinds]
    return done and all(written[:len(kinds)])  # arena 0 (always initialised) took it


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (or since `reset_peak`), in MiB.

    Linux: the high-water mark of this process's own memory (VmHWM). Not `ru_maxrss`:
    Linux carries a parent's peak into a child through fork and exec, so every worker a
    2 GiB parent starts reported at least 2 GiB (measured: a child of an 800 MiB process
    read 813 MiB of ru_maxrss and 13 MiB of VmHWM). Elsewhere ru_maxrss (macOS: bytes).
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    scale = 2**20 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


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


PAGE = resource.getpagesize()
MADV_DONTNEED = 4  # Linux and macOS


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (Linux); [] elsewhere."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[5].startswith("/") and fields[4] != "0":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of the file `path` (Linux smaps; 0 elsewhere)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    total, inside = 0, False
    for line in lines:
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: address range, ..., path
            inside = len(fields) > 5 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def tensor_spans(model) -> set[tuple[int, int]]:
    """(start, end) addresses of every storage `model` holds: parameters, buffers and the
    4-bit layers' quantisation state (absmax and its nested statistics)."""
    spans = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        state = getattr(tensor, "quant_state", None)
        nested = getattr(state, "state2", None)
        for t in (tensor, getattr(state, "absmax", None), getattr(nested, "absmax", None)):
            if t is not None and t.device.type == "cpu":
                storage = t.untyped_storage()
                spans.add((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return spans


def release_file_pages(gone: set[tuple[int, int]], kept: set[tuple[int, int]]) -> int:
    """Hand back to the OS the pages of storages in `gone` that lie in a file mapping and
    that no storage in `kept` touches; bytes released.

    A model loaded from a safetensors file keeps its tensors in one mapping of that file
    for as long as any of them lives (the embedding does), so the pages of weights that
    pruning replaced stay resident: the pruned 4-bit client measured more than the
    unpruned one. These pages are clean copies of the file (frozen weights are never
    written) and nothing refers to them any more; dropping them costs nothing, and a read
    would fetch them from the file again.
    """
    mappings, kept_pages = file_mappings(), set()
    for start, end in kept:
        kept_pages.update(range(start // PAGE, (end + PAGE - 1) // PAGE))
    pages = set()
    for start, end in gone - kept:
        if any(a <= start and end <= b for a, b in mappings):
            pages.update(p for p in range((start + PAGE - 1) // PAGE, end // PAGE)
                         if p not in kept_pages)
    if not pages:
        return 0
    madvise = _libc().madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for first, count in _runs(sorted(pages)):
        madvise(first * PAGE, count * PAGE, MADV_DONTNEED)
    return len(pages) * PAGE


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Consecutive page numbers as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs
