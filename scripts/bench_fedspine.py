"""FedSpine benchmark, every figure measured in this one run (the machines are noisy):

1. Time to target: three real `flwr run` simulations of SmolLM2-135M 4-bit under the
   heterogeneous `phones_laptops_edge` scenario, same seed, same rounds, same local steps:
   FedSpine (bandit arms), FLoRA with one uniform rank and no pruning, and FedSpine with
   random feasible arms. Simulated time per round = its slowest client's completion time
   (compute measured here × its device's slow-down + bytes over its links). The target loss
   is 95 % of the way from the start loss to the best held-out loss any of them reaches;
   printed: each one's simulated seconds to reach it, the speed-up ratios, final losses.
2. A client alone, each case in a fresh process: seconds per training step and peak RSS
   during training (the high-water mark is reset after loading and pruning), unpruned vs
   pruned to a ratio, plus the one-off cost of pruning (scoring, re-quantising).

    .venv/bin/python scripts/bench_fedspine.py                  # 5 rounds x 12 steps
    .venv/bin/python scripts/bench_fedspine.py --rounds 8 --skip-federated
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import run_worker

from fedapp.server.report import read_metrics
from fedapp.tools.submit import flower_env, run_submit

SCENARIO = "scenario=phones_laptops_edge"
VARIANTS = {  # name -> strategy overrides
    "fedspine": "strategy=fedspine",
    "flora-uniform": "strategy=flora strategy.ranks=[8]",
    "random-arms": "strategy=fedspine strategy.arm_policy=random",
}


def worker_client(ratio: float, rank: int, steps: int, slices: int, criterion: str) -> dict:
    """Load (and prune) a client's model, then time `steps` LoRA steps on it."""
    from fedapp.client.round import local_data
    from fedapp.config import build_strategy, compose_config
    from fedapp.llm.adapters import attach_lora
    from fedapp.llm.data import collate
    from fedapp.llm.memory import peak_rss_mb, reset_peak
    from fedapp.llm.model import load_base
    from fedapp.llm.train import train_steps
    from fedapp.pruning.surgery import iterative_prune

    strategy = build_strategy(compose_config(""), {})
    inst = strategy.setup
    order = dataclasses.replace(strategy.make_order(1, rank), seed=0)  # as in earlier benches
    examples, batches, pad = local_data(inst, order, 0, 4)
    model = attach_lora(load_base(inst.model_path, inst.quantization, "cpu"), rank,
                        order.lora_alpha, list(inst.target_modules), seed=0)
    train_steps(model, batches, 1, inst.lr, log_every=0)  # warm-up: kernels, allocator
    start = time.perf_counter()
    params, tuned = 1.0, []
    if ratio > 0:  # one tuning step per slice, as Taylor scoring needs; not counted below
        result = iterative_prune(
            model, ratio, slices,
            lambda m: tuned.append(train_steps(m, batches, 1, inst.lr, log_every=0).seconds),
            criterion, batches=[collate(examples[:inst.batch_size], pad)])
        params = result.params_after / result.params_before
    prune_s = time.perf_counter() - start - sum(tuned)
    train_steps(model, batches, 1, inst.lr, log_every=0)  # new shapes: warm-up again
    reset_peak()
    timed = train_steps(model, batches, steps, inst.lr, log_every=0)
    return {"ratio": ratio, "rank": rank, "seconds-per-step": timed.seconds / steps,
            "training-peak-rss-mb": peak_rss_mb(), "prune-seconds": prune_s,
            "params-ratio": params}


def federated(name: str, overrides: str, out_dir: Path) -> list[dict]:
    """One `flwr run` (its own SuperLink, stopped after); its metrics rows."""
    run_dir = out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = flower_env(f"{tmp}/flwr-home", isolated_ports=True)
        start = time.perf_counter()
        out = run_submit(ROOT, 4, overrides, run_dir, env)
        if out.returncode != 0:
            sys.exit(f"{name}: flwr run failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    print(f"[bench] {name}: {time.perf_counter() - start:.0f} s wall, run dir {run_dir}",
          flush=True)
    return read_metrics(run_dir / "metrics.jsonl")


def time_to(rows: list[dict], target: float) -> float:
    """Simulated seconds at the first evaluated round whose loss is <= target (inf: never)."""
    return next((r["sim-seconds"] for r in rows if r["eval-loss"] <= target), math.inf)


def report_federated(runs: dict[str, list[dict]]) -> None:
    start = runs["flora-uniform"][0]["eval-loss"]
    best = min(r["eval-loss"] for rows in runs.values() for r in rows)
    target = start - 0.95 * (start - best)
    print(f"\ntime to target (held-out loss {start:.4f} at start, best {best:.4f}, "
          f"target {target:.4f})")
    print(f"{'':15}{'final loss':>11}{'sim s to target':>17}{'sim s total':>13}"
          f"{'MB up+down':>12}")
    times = {}
    for name, rows in runs.items():
        times[name] = time_to(rows, target)
        print(f"{name:15}{rows[-1]['eval-loss']:>11.4f}{times[name]:>17.1f}"
              f"{rows[-1]['sim-seconds']:>13.1f}{rows[-1]['cum-mb']:>12.1f}")
    print("\nper round: loss / simulated round seconds / arms (prune ratio, rank) by device")
    for name, rows in runs.items():
        for prev, row in itertools.pairwise(rows):
            arms = ", ".join(
                f"{c.get('device', '?')}:({c.get('arm-prune-ratio', 0):g},{int(c.get('r', 0))})"
                for _, c in sorted(row["clients"].items()))
            print(f"  {name:14} round {row['round']}: {row['eval-loss']:.4f} / "
                  f"{row['sim-seconds'] - prev['sim-seconds']:7.1f} s / {arms}")
    rounds = len(runs["fedspine"]) - 1
    for other in ("flora-uniform", "random-arms"):
        if math.isinf(times["fedspine"]):
            print(f"fedspine did not reach the target in {rounds} rounds; {other} "
                  + (f"did at {times[other]:.1f} s" if math.isfinite(times[other]) else "did not either")
                  + ": speed-up < 1.4x")
        elif times["fedspine"] <= 0:
            print("the target was reached before any training (start loss = best loss)")
        else:
            ratio = times[other] / times["fedspine"]
            print(f"speed-up of fedspine over {other} to the target: {ratio:.2f}x"
                  + ("  (>= 1.4x)" if ratio >= 1.4 else "  (< 1.4x)"))
    # A target every run reaches: the worst final loss among them.
    worst = max(rows[-1]["eval-loss"] for rows in runs.values())
    reach = {name: time_to(rows, worst) for name, rows in runs.items()}
    print(f"simulated seconds to the worst final loss {worst:.4f}: "
          + ", ".join(f"{n} {t:.1f}" for n, t in reach.items())
          + ("; fedspine's speed-up: " + ", ".join(
              f"{reach[o] / reach['fedspine']:.2f}x over {o}"
              for o in ("flora-uniform", "random-arms")) if reach["fedspine"] > 0 else ""))
    print("note: flora-uniform trains the phones unpruned, over their memory budget under "
          "fedspine's memory model (conf/strategy/fedspine.yaml); a real phone of this "
          "profile could not run it")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per client case")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruned client's ratio")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-fedspine"))
    parser.add_argument("--skip-federated", action="store_true")
    parser.add_argument("--report", help="print the report of an earlier run's folder only")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ratio, rank, steps, slices, criterion = args.worker
        print(json.dumps(worker_client(float(ratio), int(rank), int(steps), int(slices),
                                       criterion)))
        return

    if args.report:
        report_federated({n: read_metrics(Path(args.report) / n / "metrics.jsonl")
                          for n in VARIANTS})
        return
    print(f"[bench] client: unpruned vs prune ratio {args.ratio}, r=8, {args.steps} steps",
          flush=True)
    cases = [run_worker(__file__, "--worker", str(r), "8", str(args.steps), "2", "taylor")
             for r in (0.0, args.ratio)]
    print("\nclient (SmolLM2-135M 4-bit, LoRA r=8 q/k/v/o, batch 4, seq <= 128; taylor, "
          "2 slices)")
    print(f"{'ratio':>6}{'s/step':>9}{'training peak RSS MiB':>23}{'params kept':>13}"
          f"{'prune s':>9}")
    for c in cases:
        print(f"{c['ratio']:>6.2f}{c['seconds-per-step']:>9.3f}{c['training-peak-rss-mb']:>23.0f}"
              f"{c['params-ratio']:>13.3f}{c['prune-seconds']:>9.1f}")
    full, pruned = cases
    print(f"unpruned / pruned: time per step {full['seconds-per-step'] / pruned['seconds-per-step']:.2f}x, "
          f"training peak RSS {full['training-peak-rss-mb'] / pruned['training-peak-rss-mb']:.2f}x; "
          f"pruning costs {pruned['prune-seconds'] / full['seconds-per-step']:.1f} unpruned steps "
          f"once per configuration")
    runs = {}
    if not args.skip_federated:
        out_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
        common = (f"{SCENARIO} num_rounds={args.rounds} seed={args.seed} "
                  f"train.local_steps={args.local_steps}")
        for name, overrides in VARIANTS.items():
            print(f"[bench] {name}: {args.rounds} rounds x {args.local_steps} steps", flush=True)
            runs[name] = federated(name, f"{common} {overrides}", out_dir)

    if runs:
        report_federated(runs)


if __name__ == "__main__":
    main()
