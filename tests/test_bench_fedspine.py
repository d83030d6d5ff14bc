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
    # prune-once's final mean 5.2772 (its last round, 1146.5 s): FedSpine at 1004.0 s
    assert "fedspine-repair to prune-once's final mean: 1.14x sooner" in line


def synthetic_run(points: list[tuple[float, float, float]]) -> dict:
    """A run of one phone (target 0.5) whose rows are (simulated s, train ratio, mean
    deployed loss)."""
    rows = [{"sim-seconds": t, "deployed-eval-loss-mean": loss,
             "clients": {"p": {"status": "ok", "train-ratio": ratio}}}
            for t, ratio, loss in points]
    return {"rows": rows, "devices": {"p": {"target": 0.5}}}


def test_sooner_to_final_compares_times_to_the_baselines_final_quality():
    bench = bench_fedspine()
    # the baseline ends at 5.0, which it first reaches at 300 s; the reference reaches
    # 5.0 at 200 s: 300 / 200 = 1.5x. Its 4.0 at 100 s before its target sparsity (ratio
    # 0.25) does not count.
    baseline = synthetic_run([(100, 0.5, 6.0), (300, 0.5, 5.0), (400, 0.5, 5.1),
                              (500, 0.5, 5.0)])
    ref = synthetic_run([(100, 0.25, 4.0), (150, 0.5, 5.5), (200, 0.5, 4.9)])
    slow = synthetic_run([(100, 0.5, 6.0), (600, 0.5, 5.2)])

    assert bench.sooner_to_final(ref, baseline) == pytest.approx(1.5)
    assert bench.sooner_to_final(baseline, ref) == 0.0  # the baseline never reaches 4.9
    assert bench.sooner_to_final(slow, baseline) == 0.0  # never reaches 5.0
    assert bench.sooner_to_final(baseline, slow) == pytest.approx(600 / 300)
