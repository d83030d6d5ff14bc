"""Process memory helpers (`fedapp.llm.memory`), each in a fresh interpreter: what a
client process imports is decided by the first import, not by a test's earlier ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
