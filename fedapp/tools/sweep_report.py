"""The comparison a sweep leaves behind: tables (CSV, Markdown) and plots of every job.

A configuration is a strategy with the overrides that vary across the sweep's jobs, the
seed aside (`config_labels`): `-m strategy=fedit,flora` compares "fedit" and "flora",
`-m train.selection=all,shed,random` compares "flora train.selection=all", ... Per
configuration, each metric is the mean over the seeds that finished with its 95 % Student-t
interval (`fedapp.tools.stats`). When a `centralized` job is in the sweep, every strategy's
gap to it is shown; every pair of strategies is compared on the final held-out loss and
answer-ranking accuracy, and a difference inside its interval reads "not distinguishable".
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

from fedapp.server.report import plt, read_metrics
from fedapp.tools.stats import LEVEL, describe_diff, diff_ci, mean_ci

COLUMNS = ["strategy", "seed", "status", "rounds", "start-loss", "final-loss", "best-loss",
           "start-rank-accuracy", "final-rank-accuracy", "rouge-l", "mb-up", "mb-down",
           "sim-seconds", "selection-seconds", "wall-seconds", "overrides"]
SUMMED = ["final-loss", "best-loss", "final-rank-accuracy", "rouge-l", "mb-up", "mb-down",
          "sim-seconds", "selection-seconds", "wall-seconds"]
COMPARED = ["final-loss", "final-rank-accuracy"]  # gaps and pairwise differences
REFERENCE = "centralized"


def collect(sweep_dir: Path) -> list[dict]:
    """Every job's result.json under the sweep directory, in job order, with its
    configuration's label (`config_labels`)."""
    paths = sorted(sweep_dir.glob("*/result.json"), key=lambda p: _job_number(p.parent.name))
    rows = [{**json.loads(p.read_text()), "job": p.parent.name} for p in paths]
    for row, label in zip(rows, config_labels(rows), strict=True):
        row["config"] = label
    return rows


def config_labels(rows: list[dict]) -> list[str]:
    """Each job's strategy followed by its overrides of the keys whose values differ across
    the jobs, the seed and the strategy aside (the seed is a replicate, the strategy named
    first): what tells the sweep's configurations apart."""
    parsed = [dict(item.partition("=")[::2] for item in str(r.get("overrides", "")).split())
              for r in rows]
    keys = sorted({k for p in parsed for k in p} - {"seed", "strategy"})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    return [" ".join([r["strategy"], *(f"{k}={p[k]}" for k in varying if k in p)])
            for r, p in zip(rows, parsed, strict=True)]


def _job_number(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (10**9, name)


def by_seed(rows: list[dict], config: str, key: str) -> dict[int, float]:
    """{seed: value} of `key` over `config`'s finished jobs (the last job of a seed wins)."""
    return {r["seed"]: r[key] for r in rows
            if r["config"] == config and r["status"] == "ok" and r.get(key) is not None}


def summarize(rows: list[dict]) -> list[dict]:
    """Per configuration: jobs, finished jobs, and (mean, CI half-width or None) of each
    metric."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        summary: dict = {"config": config, "jobs": len(mine),
                         "ok": sum(r["status"] == "ok" for r in mine)}
        for key in SUMMED:
            if values := list(by_seed(rows, config, key).values()):
                summary[key] = mean_ci(values)
        out.append(summary)
    return out


def _fmt(value) -> str:
    if isinstance(value, tuple):
        mean, half = value
        return f"{mean:.4g}" if half is None else f"{mean:.4g} ± {half:.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def difference_lines(rows: list[dict], strategies: list[str]) -> list[str]:
    """The gap of every strategy to the centralized reference (when present), then every
    pair of strategies, on each compared metric."""
    lines = []
    if REFERENCE in strategies:
        title = f"## Gap to the centralized upper bound (strategy − {REFERENCE}, {LEVEL:.0%}"
        lines += [title + " interval)", "", "| strategy | " + " | ".join(COMPARED) + " |",
                  "|---|" + "---|" * len(COMPARED)]
        for s in strategies:
            if s != REFERENCE:
                lines.append(f"| {s} | " + " | ".join(_difference(rows, s, REFERENCE, k)
                                                        for k in COMPARED) + " |")
        lines.append("")
    lines += [f"## Pairwise differences (first − second, {LEVEL:.0%} interval)", "",
              "| first | second | " + " | ".join(COMPARED) + " |",
              "|---|---|" + "---|" * len(COMPARED)]
    for a, b in itertools.combinations(strategies, 2):
        lines.append(f"| {a} | {b} | " + " | ".join(_difference(rows, a, b, k)
                                                   for k in COMPARED) + " |")
    return lines + [""]


def _difference(rows: list[dict], a: str, b: str, key: str) -> str:
    va, vb = by_seed(rows, a, key), by_seed(rows, b, key)
    if not va or not vb:
        return "-"
    return describe_diff(*diff_ci(va, vb))


def write_comparison(sweep_dir: Path) -> list[dict]:
    """(Re)write comparison.csv, comparison.md and the two plots from the jobs so far."""
    rows = collect(sweep_dir)
    if not rows:
        return rows
    with (sweep_dir / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", *COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    lines = ["# Sweep comparison", "",
             f"## Per configuration (mean ± half-width of the {LEVEL:.0%} interval over seeds)",
             "", "| configuration | ok/jobs | " + " | ".join(SUMMED) + " |",
             "|---|---|" + "---|" * len(SUMMED)]
    for s in summary:
        lines.append(f"| {s['config']} | {s['ok']}/{s['jobs']} | "
                     + " | ".join(_fmt(s.get(k)) for k in SUMMED) + " |")
    lines.append("")
    lines += difference_lines(rows, [s["config"] for s in summary])
    lines += ["## Per job", "", "| job | " + " | ".join(COLUMNS) + " |",
              "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['job']} | " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |")
    (sweep_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    plot_jobs(sweep_dir, rows)
    return rows


def strategy_curves(sweep_dir: Path, rows: list[dict], x_key: str, y_key: str
                    ) -> dict[str, list[list[tuple[float, float]]]]:
    """{configuration: one [(x, y) per round] per finished job that recorded `y_key`}."""
    curves: dict[str, list[list[tuple[float, float]]]] = {}
    for row in rows:
        path = sweep_dir / row["job"] / "run" / "metrics.jsonl"
        if row["status"] != "ok" or not path.exists():
            continue
        points = [(m[x_key], m[y_key]) for m in read_metrics(path) if y_key in m]
        if points:
            curves.setdefault(row["config"], []).append(points)
    return curves


def plot_jobs(sweep_dir: Path, rows: list[dict]) -> None:
    """Held-out loss vs round and vs cumulative MB, and answer-ranking accuracy vs round:
    per configuration the mean over seeds, its interval as a band (vs round), each seed faint."""
    for x_key, y_key, name, x_label, y_label in (
            ("round", "eval-loss", "loss_vs_round.png", "round", "held-out loss"),
            ("cum-mb", "eval-loss", "loss_vs_mb.png", "cumulative MB (up + down)",
             "held-out loss"),
            ("round", "eval-rank-accuracy", "rank_accuracy_vs_round.png", "round",
             "answer-ranking accuracy")):
        curves = strategy_curves(sweep_dir, rows, x_key, y_key)
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for strategy, runs in curves.items():
            line = _plot_strategy(ax, strategy, runs, banded=x_key == "round")
            for points in runs:
                ax.plot(*zip(*points, strict=True), color=line.get_color(), alpha=0.25, lw=0.8)
        ax.set(xlabel=x_label, ylabel=y_label, title=f"{y_label} vs {x_label}")
        if x_key == "round":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(sweep_dir / name, dpi=100)
        plt.close(fig)


def _plot_strategy(ax, strategy: str, runs: list[list[tuple[float, float]]], banded: bool):
    """The mean curve over seeds (rounds all runs reached), with its interval band when the
    x axis is shared (rounds); each seed's own curve otherwise."""
    if not banded:
        return ax.plot(*zip(*runs[0], strict=True), marker="o", label=f"{strategy}")[0]
    rounds = min(len(points) for points in runs)
    xs = [runs[0][i][0] for i in range(rounds)]
    stats = [mean_ci([points[i][1] for points in runs]) for i in range(rounds)]
    means = [m for m, _ in stats]
    line = ax.plot(xs, means, marker="o", label=f"{strategy} (n={len(runs)})")[0]
    if all(h is not None for _, h in stats):
        ax.fill_between(xs, [m - h for m, h in stats], [m + h for m, h in stats],
                        color=line.get_color(), alpha=0.2)
    return line
