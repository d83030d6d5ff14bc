"""What the benchmark scripts share: running one measurement in a fresh Python process,
reading a bench folder of `<method>-seed<n>` runs, and plotting their held-out loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_worker(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run `script` with `args` in a fresh interpreter (clean peak RSS, cold caches; on the
    app's allocator, `fedapp.tools.allocator`, unless `env` says otherwise) and return the
    JSON object its last stdout line holds; exit with its stderr if it failed."""
    from fedapp.tools.allocator import allocator_env

    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                         check=False, env=env if env is not None else allocator_env(dict(os.environ)))
    if out.returncode != 0:
        sys.exit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_runs(out: Path) -> dict[str, dict[int, dict]]:
    """{method: {seed: run}} of the `<method>-seed<n>` run folders under `out` that hold
    metrics; a run is its metrics rows, composed config and aggregate.json."""
    from omegaconf import OmegaConf

    from fedapp.server.report import read_metrics

    runs: dict[str, dict[int, dict]] = {}
    for run_dir in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()):
        method, seed = run_dir.name.rsplit("-seed", 1)
        runs.setdefault(method, {})[int(seed)] = {
            "dir": run_dir, "rows": read_metrics(run_dir / "metrics.jsonl"),
            "cfg": OmegaConf.load(run_dir / "config.yaml"),
            "meta": json.loads((run_dir / "aggregate.json").read_text())}
    return runs


def plot_loss(runs: dict[str, dict[int, dict]], path: Path, x: str, labels: tuple[str, str, str]
              ) -> None:
    """Held-out loss of every run against the rows' `x` (e.g. "round", "sim-seconds");
    `labels` = (x label, y label, title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method, rs in runs.items():
        for seed, run in rs.items():
            rows = run["rows"]
            ax.plot([r[x] for r in rows], [r["eval-loss"] for r in rows], marker=".",
                    label=f"{method} seed {seed}")
    ax.set(xlabel=labels[0], ylabel=labels[1], title=labels[2])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
