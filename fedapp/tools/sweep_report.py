"""The comparison a sweep leaves behind: tables (CSV, Markdown) and plots of every job."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from fedapp.server.report import plt, read_metrics

COLUMNS = ["strategy", "seed", "status", "rounds", "start-loss", "final-loss", "best-loss",
           "mb-up", "mb-down", "sim-seconds", "wall-seconds", "overrides"]
SUMMED = ["final-loss", "best-loss", "mb-up", "mb-down", "sim-seconds", "wall-seconds"]


def collect(sweep_dir: Path) -> list[dict]:
    """Every job's result.json under the sweep directory, in job order."""
    paths = sorted(sweep_dir.glob("*/result.json"), key=lambda p: _job_number(p.parent.name))
    return [{**json.loads(p.read_text()), "job": p.parent.name} for p in paths]


def _job_number(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (10**9, name)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± spread (population std) per strategy over the jobs that finished."""
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        ok = [r for r in mine if r["status"] == "ok"]
        summary: dict = {"strategy": strategy, "jobs": len(mine), "ok": len(ok)}
        for key in SUMMED:
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                summary[key] = (statistics.fmean(values), statistics.pstdev(values))
        out.append(summary)
    return out


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return f"{value[0]:.4g} ± {value[1]:.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


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
    lines = ["# Sweep comparison", "", "## Per strategy (mean ± spread over seeds)", "",
             "| strategy | ok/jobs | " + " | ".join(SUMMED) + " |",
             "|---|---|" + "---|" * len(SUMMED)]
    for s in summary:
        lines.append(f"| {s['strategy']} | {s['ok']}/{s['jobs']} | "
                     + " | ".join(_fmt(s.get(k)) for k in SUMMED) + " |")
    lines += ["", "## Per job", "", "| job | " + " | ".join(COLUMNS) + " |",
              "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['job']} | " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |")
    (sweep_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    plot_jobs(sweep_dir, rows)
    return rows


def plot_jobs(sweep_dir: Path, rows: list[dict]) -> None:
    """Held-out loss vs round and vs cumulative MB, one line per finished job."""
    for x_key, name, label in (("round", "loss_vs_round.png", "round"),
                               ("cum-mb", "loss_vs_mb.png", "cumulative MB (up + down)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in rows:
            path = sweep_dir / row["job"] / "run" / "metrics.jsonl"
            if row["status"] != "ok" or not path.exists():
                continue
            metrics = read_metrics(path)
            ax.plot([m[x_key] for m in metrics], [m["eval-loss"] for m in metrics],
                    marker="o", label=f"{row['strategy']} s{row['seed']}")
        ax.set(xlabel=label, ylabel="held-out loss", title=f"Held-out loss vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(sweep_dir / name, dpi=100)
        plt.close(fig)
