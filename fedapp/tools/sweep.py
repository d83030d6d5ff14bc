"""Hydra multirun sweeps: every composed configuration runs as a real Flower simulation.

    python -m fedapp.tools.sweep -m strategy=fedit,flora,flexlora,ffa,zeropad,oneshot seed=0,1
    python -m fedapp.tools.sweep -m strategy=fedit,flora,oneshot +preset=quick
    python -m fedapp.tools.sweep --seeds 3 -m strategy=flora,fedit,centralized +preset=quick

Each job submits the app with `flwr run` (the same conf/ the ServerApp composes, the job's
overrides passed through) into `<sweep dir>/<job>/run`. After every job the sweep directory's
comparison is rewritten: `comparison.csv`, `comparison.md` (per strategy, mean and 95 %
interval over seeds; the gap to `centralized` when it ran; pairwise differences; per job)
and `loss_vs_round.png`, `loss_vs_mb.png`, `rank_accuracy_vs_round.png` (`sweep_report`).
A failed job is a row with its reason, never silently dropped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedapp.config import conf_dir, strategy_class
from fedapp.server.report import read_metrics
from fedapp.tools.submit import flower_env, run_submit
from fedapp.tools.sweep_report import write_comparison

ROOT = Path(__file__).resolve().parents[2]


def job_result(run_dir: Path, overrides: list[str], cfg: DictConfig, status: str,
               wall: float) -> dict:
    """One row of the comparison: what this job achieved, at what cost."""
    row = {"strategy": strategy_class(cfg).name, "seed": int(cfg.seed), "status": status,
           "overrides": " ".join(overrides), "wall-seconds": round(wall, 1)}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and (rows := read_metrics(metrics)):
        row.update({
            "rounds": rows[-1]["round"],
            "start-loss": rows[0]["eval-loss"],
            "final-loss": rows[-1]["eval-loss"],
            "best-loss": min(r["eval-loss"] for r in rows),
            "start-rank-accuracy": rows[0].get("eval-rank-accuracy"),
            "final-rank-accuracy": rows[-1].get("eval-rank-accuracy"),
            "mb-up": sum(r["bytes-up"] for r in rows) / 2**20,
            "mb-down": sum(r["bytes-down"] for r in rows) / 2**20,
            "sim-seconds": rows[-1].get("sim-seconds"),
            "selection-seconds": sum(c.get("selection-seconds", 0.0) for r in rows
                                     for c in r.get("clients", {}).values()),
        })
    generations = run_dir / "generations.json"
    if generations.exists():
        row["rouge-l"] = json.loads(generations.read_text()).get("rouge-l-final")
    return row


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    job_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode.name == "MULTIRUN" else job_dir
    run_dir = job_dir / "run"
    env = flower_env(job_dir / "flwr-home", isolated_ports=True)
    print(f"[sweep] job {job_dir.name}: {' '.join(overrides) or '(defaults)'}", flush=True)
    start = time.monotonic()
    proc = run_submit(ROOT, int(cfg.scenario.num_clients), " ".join(overrides), run_dir, env)
    (job_dir / "flwr.log").write_text(proc.stdout + proc.stderr)
    status = "ok" if proc.returncode == 0 else "failed: " + _reason(proc.stdout + proc.stderr)
    row = job_result(run_dir, overrides, cfg, status, time.monotonic() - start)
    (job_dir / "result.json").write_text(json.dumps(row, indent=2))
    print(f"[sweep] job {job_dir.name}: {status}, final loss {row.get('final-loss', '-')}",
          flush=True)
    write_comparison(sweep_dir)


def _reason(log: str) -> str:
    """The most telling line of a failed run's log: its last error."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def seeds_argument(argv: list[str]) -> list[str]:
    """Hydra's arguments with `--seeds N` (run every configuration over seeds 0..N-1)
    turned into the multirun sweep `seed=0,...,N-1`."""
    if "--seeds" not in argv:
        return argv
    at = argv.index("--seeds")
    value = argv[at + 1] if at + 1 < len(argv) else ""
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"--seeds={value!r}; allowed: an integer >= 1 (the number of seeds "
                         "each configuration runs with, seeds 0..N-1)")
    rest = argv[:at] + argv[at + 2:]
    if any(a.startswith("seed=") for a in rest):
        raise SystemExit("--seeds and seed=... both given; allowed: one of them")
    sweep = "seed=" + ",".join(str(i) for i in range(int(value)))
    multirun = [] if "-m" in rest or "--multirun" in rest else ["-m"]
    return rest[:1] + multirun + rest[1:] + [sweep]


if __name__ == "__main__":
    sys.argv = seeds_argument(sys.argv)
    main()
