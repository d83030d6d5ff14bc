"""scripts/bench_fedspine.py's report: ratios only over the seeds both methods ran."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench-fedspine-relative" / "combined"  # committed: 15 rounds x 2 seeds


def bench_fedspine():
    """scripts/bench_fedspine.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_fedspine",
                                                  ROOT / "scripts" / "bench_fedspine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not RUNS.exists(), reason="the committed 15-round bench is not here")
def test_a_baseline_with_one_seed_is_compared_on_that_seed_alone(tmp_path):
    for run in ("fedspine-repair-seed0", "fedspine-repair-seed1", "prune-once-seed0"):
        shutil.copytree(RUNS / run, tmp_path / run)
    text = bench_fedspine().report(tmp_path)
    # the worst final mean is prune-once's seed 0 (5.2772): it reaches it in its last round
    # (1146.5 simulated s), FedSpine's seed 0 in round 12 (1004.0 s), its seed 1 only in
    # round 15 (1216.9 s). Over seed 0 alone: 1146.5 / 1004.0 = 1.14x; a mean over
    # FedSpine's two seeds would have read 1146.5 / 1110.5 = 1.03x
    line = next(x for x in text.splitlines() if x.startswith("- prune-once:"))
    assert "seeds [0]" in line and "to worst final 1.14x" in line
    assert "| 1 | fedspine-repair |" in text and "| 1 | prune-once |" not in text
    assert (tmp_path / "deployed_loss.png").exists()
    # the sparsity a device's model measured (prune-once's phone after round 1: 0.5104 in
    # its metrics.jsonl), beside the orders' 0.50
    assert "partition-0 phone 0.50/0.50 measured 0.510" in text
