"""The run directory: composed config, metrics.jsonl (one line per round) and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib
import psutil

from strategies.summary import RoundSummary

matplotlib.use("Agg")  # no screen on servers
import matplotlib.pyplot as plt

MB = 1024 * 1024


class RunRecorder:
    """Appends one JSON line per evaluated round and keeps cumulative traffic."""

    def __init__(self, run_dir: Path, strategy: str) -> None:
        self.run_dir = run_dir
        self.strategy = strategy
        self.sim_seconds = 0.0
        self.metrics_path = run_dir / "metrics.jsonl"
        self.start = time.monotonic()
        self.cum_up = 0
        self.cum_down = 0
        self.rows: list[dict] = []
        self.cpu_mark = time.process_time()

    def state_dict(self) -> dict:
        return {"cum_up": self.cum_up, "cum_down": self.cum_down,
                "sim_seconds": self.sim_seconds,
                "wall_seconds": time.monotonic() - self.start}

    def load_state(self, state: dict, last_round: int) -> None:
        """Continue a checkpointed run: counters back, metrics.jsonl cut after `last_round`
        (a crash between writing metrics and the checkpoint leaves a line too many)."""
        self.cum_up, self.cum_down = state["cum_up"], state["cum_down"]
        self.sim_seconds = state["sim_seconds"]
        self.start = time.monotonic() - state["wall_seconds"]
        self.rows = [r for r in read_metrics(self.metrics_path) if r["round"] <= last_round]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def record(self, server_round: int, eval_metrics: dict[str, float],
               summary: RoundSummary | None) -> dict:
        """One line of metrics.jsonl: the evaluation, the round's traffic and clients, and the
        simulated time so far (clients train in parallel: a round lasts as long as its
        slowest accepted client's `completion-seconds`, strategies.devices), and the server
        process's own cost: CPU seconds since the last line and resident memory now."""
        summary = summary or RoundSummary(server_round)  # round 0: no clients yet
        self.cum_up += summary.bytes_up
        self.cum_down += summary.bytes_down
        self.sim_seconds += summary.sim_seconds
        row = {
            "round": server_round,
            "strategy": self.strategy,
            "train-loss": summary.train_loss,
            **eval_metrics,
            "bytes-up": summary.bytes_up,
            "bytes-down": summary.bytes_down,
            "cum-mb": (self.cum_up + self.cum_down) / MB,
            "wall-seconds": round(time.monotonic() - self.start, 2),
            "sim-seconds": round(self.sim_seconds, 2),
            "server-cpu-seconds": round(time.process_time() - self.cpu_mark, 3),
            "server-rss-mb": round(psutil.Process().memory_info().rss / MB, 1),
            **({k: v for k, v in summary.to_json().items() if k != "train-loss"}
               if summary.clients else {}),
        }
        self.cpu_mark = time.process_time()
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_eval_loss(rows: list[dict], out: Path, label: str) -> Path:
    """Eval loss against round and against cumulative MB on the wire, side by side."""
    fig, (ax_round, ax_mb) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r["round"] for r in rows]
    losses = [r["eval-loss"] for r in rows]
    mbs = [r["cum-mb"] for r in rows]
    ax_round.plot(rounds, losses, marker="o", label=label)
    ax_round.set(xlabel="round", ylabel="held-out loss", title="Held-out loss per round")
    ax_mb.plot(mbs, losses, marker="o", label=label)
    ax_mb.set(xlabel="cumulative MB (up + down)", ylabel="held-out loss",
              title="Held-out loss vs communication")
    for ax in (ax_round, ax_mb):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
