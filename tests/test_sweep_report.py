"""Seeds and intervals in sweep comparisons: hand-computed intervals, the centralized gap,
"not distinguishable", the band plots and the `--seeds` argument."""

from __future__ import annotations

import json
import math

import pytest

from fedapp.tools.stats import NOT_DISTINGUISHABLE, describe_diff, diff_ci, mean_ci
from fedapp.tools.sweep import seeds_argument
from fedapp.tools.sweep_report import write_comparison


def test_mean_ci_is_the_student_t_interval():
    # mean 2, sample sd 1, n = 3: t(0.975, 2) = 4.302653 → half-width 4.302653 / sqrt(3)
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_ci([5.0]) == (5.0, None)


def test_paired_difference_by_seed_and_welch_otherwise():
    a = {0: 1.0, 1: 2.0, 2: 3.0}
    b = {0: 0.9, 1: 1.8, 2: 2.7}  # paired differences 0.1, 0.2, 0.3
    diff, half = diff_ci(a, b)
    assert diff == pytest.approx(0.2)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)

    # different seeds: Welch. Both variances 1, n = 3: se² = 2/3, df = (2/3)² / (2 (1/3)²/2) = 4
    diff, half = diff_ci({0: 1.0, 1: 2.0, 2: 3.0}, {3: 0.0, 4: 1.0, 5: 2.0})
    assert diff == pytest.approx(1.0)
    assert half == pytest.approx(2.776445 * math.sqrt(2 / 3), rel=1e-6)


def test_a_difference_inside_its_interval_is_not_distinguishable():
    assert describe_diff(0.01, 0.05) == NOT_DISTINGUISHABLE
    assert describe_diff(-0.2, 0.05) == "-0.2000 ± 0.0500"
    assert describe_diff(0.3, None) == "+0.3000 (one seed)"


def write_job(sweep_dir, job: int, strategy: str, seed: int, losses: list[float],
              accuracies: list[float], overrides: str = "") -> None:
    folder = sweep_dir / str(job)
    (folder / "run").mkdir(parents=True)
    rows = [{"round": i, "eval-loss": loss, "eval-rank-accuracy": acc, "cum-mb": float(i)}
            for i, (loss, acc) in enumerate(zip(losses, accuracies, strict=True))]
    (folder / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "result.json").write_text(json.dumps({
        "strategy": strategy, "seed": seed, "status": "ok", "rounds": len(rows) - 1,
        "final-loss": losses[-1], "best-loss": min(losses),
        "start-rank-accuracy": accuracies[0], "final-rank-accuracy": accuracies[-1],
        "overrides": overrides}))


def test_the_comparison_shows_intervals_the_centralized_gap_and_bands(tmp_path):
    job = 0
    for seed, shift in enumerate((0.0, 0.1, -0.1)):
        for strategy, final in (("flora", 3.5), ("fedit", 3.5 + 0.001 * (seed - 1)),
                                ("centralized", 3.0)):
            write_job(tmp_path, job, strategy, seed, [4.0 + shift, final + shift],
                      [0.25, 0.5 if strategy != "centralized" else 0.75])
            job += 1

    write_comparison(tmp_path)

    text = (tmp_path / "comparison.md").read_text()
    # flora − centralized is exactly 0.5 on every seed: a zero-width interval
    assert "| flora | +0.5000 ± 0.0000 | -0.2500 ± 0.0000 |" in text
    # fedit and flora differ by -0.001, 0, +0.001 over the seeds: inside the interval
    assert f"| flora | fedit | {NOT_DISTINGUISHABLE} | {NOT_DISTINGUISHABLE} |" in text
    # per strategy: mean ± half-width of the final loss over the three seeds
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert f"| flora | 3/3 | 3.5 ± {half:.2g} |" in text
    for png in ("loss_vs_round.png", "loss_vs_mb.png", "rank_accuracy_vs_round.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_a_sweep_over_other_keys_compares_each_configuration(tmp_path):
    # Prepare: one strategy, train.selection and its budget as axes, two seeds each
    job = 0
    for seed in (0, 1):
        for selection, budget, final in (("all", "1.0", 3.5), ("shed", "0.5", 3.4),
                                         ("random", "0.5", 3.6)):
            write_job(tmp_path, job, "flora", seed, [4.0, final + 0.01 * seed], [0.2, 0.3],
                      f"+preset=quick train.selection={selection} "
                      f"train.selection_budget={budget} seed={seed}")
            job += 1

    # Execute
    write_comparison(tmp_path)

    # Assert: a row per configuration, named by the overrides that vary (not the constant
    # preset, not the seed), each over its two seeds; every job's overrides in its row
    text = (tmp_path / "comparison.md").read_text()
    for selection, budget, final in (("all", "1.0", 3.505), ("shed", "0.5", 3.405),
                                     ("random", "0.5", 3.605)):
        label = f"flora train.selection={selection} train.selection_budget={budget}"
        assert f"| {label} | 2/2 | {final:.4g} ± " in text
    assert "| flora train.selection=shed train.selection_budget=0.5 | flora train.selection=" \
           "random train.selection_budget=0.5 | -0.2000 ± 0.0000 |" in text
    assert text.count("+preset=quick train.selection=") == 6


def test_seeds_argument_becomes_a_seed_sweep():
    assert seeds_argument(["sweep", "--seeds", "3", "-m", "strategy=flora"]) == [
        "sweep", "-m", "strategy=flora", "seed=0,1,2"]
    assert seeds_argument(["sweep", "--seeds", "1"]) == ["sweep", "-m", "seed=0"]
    assert seeds_argument(["sweep", "--seeds", "2", "strategy=flora"]) == [
        "sweep", "-m", "strategy=flora", "seed=0,1"]  # -m before the overrides Hydra parses
    for bad in (["--seeds", "0"], ["--seeds", "x"], ["--seeds"]):
        with pytest.raises(SystemExit, match="allowed: an integer >= 1"):
            seeds_argument(["sweep", *bad])
    with pytest.raises(SystemExit, match="one of them"):
        seeds_argument(["sweep", "--seeds", "2", "seed=5"])
