"""Many clients in simulation: server cost per round against the number of sampled clients.

Runs `flwr run` (the local simulation SuperLink, Ray backend) once per configuration of
`--clients` simulated clients with `--sampled` of them training per round (`+preset=
hundred_clients` with `scenario.fraction_train` set to sampled / clients), FLoRA with ranks
cycled over 4/8/16, and prints per configuration, from the run's metrics.jsonl:

- round wall seconds (rounds 2.., the first pays the start-up), which grow with the sampled
  clients because the simulated clients share this machine's cores;
- server CPU seconds per round (the ServerApp process alone: sampling, messages, checking
  replies, stacking, re-compression, evaluation) and per sampled client;
- server RSS after each round (max over rounds) and its growth from round 1 to the last;
- the most Ray worker processes alive at any moment, sampled every 0.5 s: the client process
  pool is sized by the backend's resources, not by the number of clients.

A plot of the three server figures against the sampled clients goes to `--out`.

    .venv/bin/python scripts/bench_scale.py [--clients 100] [--sampled 10 15 20]
        [--rounds 3] [--steps 2] [--model tiny | PATH]

`--model tiny` (the default) builds the 2-layer test model (tests/tiny.py): the server's
cost, not the clients', is what this measures. Give a model path for a real one.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import psutil

from fedapp.server.report import read_metrics
from fedapp.tools.submit import flower_env, run_submit


def ray_workers() -> list[psutil.Process]:
    """Ray's worker processes on this machine, idle or running an actor (the simulated
    clients run inside them); not Ray's own agents and monitors."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::") and ("Actor" in cmd or "IDLE" in cmd):
            found.append(proc)
    return found


class PoolWatch(threading.Thread):
    """Counts Ray worker processes every `every` seconds until stopped; keeps the maximum."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.most, self.done = every, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.most = max(self.most, len(ray_workers()))
            self.done.wait(self.every)


def one_run(work: Path, model: Path, clients: int, sampled: int, rounds: int, steps: int
            ) -> dict:
    overrides = (f"model.path={model} +preset=hundred_clients scenario.num_clients={clients} "
                 f"scenario.fraction_train={sampled / clients} scenario.min_train_nodes="
                 f"{sampled} scenario.min_replies={max(1, sampled // 2)} num_rounds={rounds} "
                 f"train.local_steps={steps} train.max_length=64 strategy.ranks=[4,8,16] "
                 "eval.max_examples=16 eval.ranking_examples=0 eval.generate_examples=0")
    run_dir = work / f"{clients}-{sampled}"
    watch = PoolWatch()
    watch.start()
    start = time.monotonic()
    out = run_submit(ROOT, clients, overrides, run_dir,
                     flower_env(work / f"home-{clients}-{sampled}", isolated_ports=True),
                     timeout=3600)
    watch.done.set()
    watch.join()
    if out.returncode != 0:
        sys.exit(f"the run with {clients} clients, {sampled} sampled failed:\n"
                 f"{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    rows = read_metrics(run_dir / "metrics.jsonl")[1:]
    walls = [b["wall-seconds"] - a["wall-seconds"] for a, b in itertools.pairwise(rows)]
    cpu = [r["server-cpu-seconds"] for r in rows[1:]] or [rows[0]["server-cpu-seconds"]]
    rss = [r["server-rss-mb"] for r in rows]
    return {"clients": clients, "sampled": sampled, "accepted": [r["accepted"] for r in rows],
            "round_wall": statistics.fmean(walls) if walls else float("nan"),
            "server_cpu": statistics.fmean(cpu), "server_rss": max(rss),
            "rss_growth": rss[-1] - rss[0], "workers": watch.most,
            "total_wall": time.monotonic() - start}


def plot(results: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for clients in sorted({r["clients"] for r in results}):
        rs = sorted((r for r in results if r["clients"] == clients), key=lambda r: r["sampled"])
        xs = [r["sampled"] for r in rs]
        for ax, key, label in zip(axes, ("round_wall", "server_cpu", "server_rss"),
                                  ("round wall (s)", "server CPU per round (s)",
                                   "server RSS (MiB)")):
            ax.plot(xs, [r[key] for r in rs], marker="o", label=f"{clients} clients")
            ax.set(xlabel="clients sampled per round", ylabel=label)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100])
    parser.add_argument("--sampled", type=int, nargs="+", default=[10, 15, 20])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-scale"))
    args = parser.parse_args()
    if any(s > c for s in args.sampled for c in args.clients):
        sys.exit(f"--sampled {args.sampled} must not exceed --clients {args.clients}")
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    model = Path(args.model)
    if args.model == "tiny":
        from tests.tiny import build_tiny_model
        model = build_tiny_model(out / "tiny-model")
    results = []
    for clients in args.clients:
        for sampled in args.sampled:
            print(f"[bench] {clients} clients, {sampled} sampled per round, {args.rounds} "
                  "rounds ...", flush=True)
            results.append(one_run(out, model, clients, sampled, args.rounds, args.steps))
            r = results[-1]
            print(f"[bench]   done in {r['total_wall']:.0f} s; accepted per round "
                  f"{r['accepted']}", flush=True)
    print(f"\n{'clients':>7} {'sampled':>7} {'round wall s':>12} {'server CPU s':>12} "
          f"{'CPU s/client':>12} {'server RSS MiB':>14} {'RSS growth':>10} {'Ray workers':>11}")
    for r in results:
        print(f"{r['clients']:>7} {r['sampled']:>7} {r['round_wall']:>12.1f} "
              f"{r['server_cpu']:>12.2f} {r['server_cpu'] / r['sampled']:>12.3f} "
              f"{r['server_rss']:>14.0f} {r['rss_growth']:>10.1f} {r['workers']:>11}")
    for clients in args.clients:
        rs = sorted((r for r in results if r["clients"] == clients), key=lambda r: r["sampled"])
        first, last = rs[0], rs[-1]
        if first is last:
            continue
        print(f"{clients} clients, {last['sampled']} vs {first['sampled']} sampled "
              f"({last['sampled'] / first['sampled']:.2f}x): round wall "
              f"{last['round_wall'] / first['round_wall']:.2f}x, server CPU "
              f"{last['server_cpu'] / first['server_cpu']:.2f}x, server RSS "
              f"{last['server_rss'] / first['server_rss']:.2f}x")
    print(f"Ray worker processes, most at once, per run: {[r['workers'] for r in results]}")
    plot(results, out / "scale.png")
    print(f"plot: {out / 'scale.png'}")


if __name__ == "__main__":
    main()
