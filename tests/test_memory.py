"""Process memory helpers (`fedapp.llm.memory`), each in a fresh interpreter: what a
client process imports is decided by the first import, not by a test's earlier ones."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedapp.llm import memory
from fedapp.llm.model import load_base
from fedapp.pruning.importance import magnitude_importance
from fedapp.pruning.surgery import plan_pruning, prune_model

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def test_bitsandbytes_comes_without_the_compiler_and_torch_compile_is_given_back():
    found = _fresh(
        "import json, sys, torch\n"
        "compile_ = torch.compile\n"
        "import fedapp.llm\n"
        "from bitsandbytes.backends.default import ops\n"
        "print(json.dumps({'restored': torch.compile is compile_,\n"
        "  'wrapped': hasattr(ops._dequantize_4bit_compute, '__wrapped__'),\n"
        "  'inductor': 'torch._inductor' in sys.modules}))\n")
    assert found == {"restored": True, "wrapped": False, "inductor": False}


def test_without_it_bitsandbytes_wraps_its_kernels_in_the_compiler():
    # the behaviour `import_bitsandbytes` exists for: if bitsandbytes stops compiling at
    # import, this fails and the helper can go
    found = _fresh(
        "import json, sys\n"
        "from bitsandbytes.backends.default import ops\n"
        "print(json.dumps({'wrapped': hasattr(ops._dequantize_4bit_compute, '__wrapped__'),\n"
        "  'inductor': 'torch._inductor' in sys.modules}))\n")
    assert found == {"wrapped": True, "inductor": True}


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc needed")
def test_released_file_pages_leave_the_resident_set_and_read_back_from_the_file(tmp_path):
    page = memory.PAGE
    values = torch.arange(64 * page // 4, dtype=torch.float32)  # 64 pages of floats
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)
    dropped, kept = mapped[: 40 * page // 4], mapped[40 * page // 4:]  # views of one mapping
    assert float(mapped.sum()) == float(values.sum())  # every page resident now
    assert memory.mapped_kib(path) == 64 * page // 1024
    start = mapped.data_ptr()
    gone = {(start, start + 40 * page + 8)}  # ends 8 bytes into a kept page
    released = memory.release_file_pages(gone, {(start + 40 * page, start + 64 * page)})
    assert released == 40 * page  # the shared page stays
    assert memory.mapped_kib(path) == 24 * page // 1024
    assert torch.equal(dropped, values[: 40 * page // 4])  # faulted back in from the file
    assert torch.equal(kept, values[40 * page // 4:])


def test_memory_outside_file_mappings_is_never_released():
    heap = torch.arange(1 << 20, dtype=torch.float32)  # anonymous memory: released = lost
    start = heap.untyped_storage().data_ptr()
    assert memory.release_file_pages({(start, start + heap.nbytes)}, set()) == 0
    assert torch.equal(heap, torch.arange(1 << 20, dtype=torch.float32))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc needed")
def test_pruning_hands_back_the_file_pages_of_what_it_cut(tiny_model_dir, monkeypatch):
    # the loaded weights are views of one mapping of the checkpoint file, kept alive by the
    # embedding: without the release, the cut weights' pages would stay resident. In 4-bit
    # the tiny model's weights are smaller than a page (SmolLM2's: bench_client, pruned)
    inputs, plan, quant = _ids(), None, "none"
    loaded = tiny_model_dir / "model.safetensors"

    def pruned_logits(release: bool) -> tuple[torch.Tensor, int, int]:
        nonlocal plan
        with monkeypatch.context() as patch:
            if not release:
                patch.setattr(memory, "release_file_pages", lambda gone, kept: 0)
            base = load_base(str(tiny_model_dir), quant, "cpu")
            _logits(base, inputs)  # every weight paged in
            plan = plan or plan_pruning(magnitude_importance(base), 0.5)
            before = memory.mapped_kib(loaded)
            prune_model(base, plan)
            return _logits(base, inputs), before, memory.mapped_kib(loaded)

    kept_pages, _, resident_kept = pruned_logits(release=False)
    gc.collect()
    released, before, after = pruned_logits(release=True)
    assert torch.equal(released, kept_pages)  # nothing still in use was handed back
    assert resident_kept == before > 0
    assert after < 0.8 * before


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc needed")
def test_a_child_process_reports_its_own_peak_not_its_parents():
    held = torch.ones(256 * 2**20 // 4)  # this process: at least 256 MiB resident
    assert memory.peak_rss_mb() > 256
    # the child loads only the memory module (no torch): a peak of a few tens of MiB
    child = _fresh(
        "import importlib.util, json\n"
        "spec = importlib.util.spec_from_file_location('m', 'fedapp/llm/memory.py')\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps({'peak': m.peak_rss_mb()}))\n")
    assert child["peak"] < 100 < held.nbytes / 2**20
