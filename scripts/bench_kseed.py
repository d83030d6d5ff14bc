"""FedKSeed against FLoRA on the default scenario, in one run.

1. One client round of each, in a fresh process (the real client code, SmolLM2 in 4-bit on
   this CPU, partition 0 of 4): peak RSS and seconds per step. A FedKSeed step is two
   forward passes and no backward, so its client needs no activations kept for a backward
   pass and no optimizer state.
2. Replay: the seconds a client takes to rebuild the LoRA from the K scalars when one
   round's steps touched them, and when all K are non-zero: the most a client that missed
   any number of rounds can ever have to replay.
3. Federated: `flwr run` of the default scenario (4 clients, `--rounds` rounds) with FLoRA
   and with FedKSeed given `strategy.steps` = FLoRA's local steps x FLoRA's s/step / FedKSeed's
   s/step from part 1, so that both use the same client compute time; per round the
   held-out loss and the bytes up and down per client.

    .venv/bin/python scripts/bench_kseed.py [--rounds 3] [--kseed "strategy.zo_lr=1e-4"]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import run_worker

MiB = 1024 * 1024


def worker_client(kind: str, options: str) -> dict:
    """One client round of `kind` (flora or fedkseed) in this fresh process."""
    import torch

    from fedapp.client.round import run_round
    from fedapp.client.zeroth import zo_round
    from fedapp.config import build_strategy, compose_config
    from fedapp.llm import memory
    from fedapp.llm.adapters import target_module_shapes
    from fedapp.llm.model import cached_base
    from strategies.base import ClientIdentity
    from strategies.kseed_math import SCALARS, adapter_state

    cfg = compose_config(f"strategy={kind} {options}")
    base = cached_base(cfg.model.path, cfg.model.quantization, "cpu")
    strategy = build_strategy(cfg, target_module_shapes(base, list(cfg.lora.target_modules)))
    order = strategy.order_for(1, ClientIdentity("partition-0", 0))
    memory.reset_peak()
    if kind == "fedkseed":
        k = strategy.zo.seeds
        result = zo_round(strategy.setup, order, 0, 4, {SCALARS: torch.zeros(k).double()},
                          device="cpu")
        out = {"peak": memory.peak_rss_mb(), "replay": {}}
        touched = {"one round": min(k, 4 * order.local_steps), "all K": k}
        for label, count in touched.items():
            scalars = torch.zeros(k, dtype=torch.float64)
            scalars[torch.randperm(k, generator=torch.Generator().manual_seed(0))[:count]] = 1e-3
            start = time.perf_counter()
            adapter_state(strategy.module_shapes, order.lora_r, strategy.zo.run_seed, scalars,
                          strategy.zo.lr)
            out["replay"][label] = {"seeds": count, "seconds": time.perf_counter() - start}
    else:
        result = run_round(strategy.setup, order, 0, 4, {}, device="cpu")
        out = {"peak": memory.peak_rss_mb()}
    steps = order.local_steps
    out.update({"steps": steps, "s_per_step": result.metrics["train-seconds"] / steps,
                "client_peak": result.metrics["peak-rss-mb"],
                "trainable": sum(v.numel() for v in result.state.values())})
    return out


def federated(kind: str, overrides: str, rounds: int, work: Path) -> list[dict]:
    from fedapp.server.report import read_metrics
    from fedapp.tools.submit import flower_env, run_submit

    run_dir = work / kind
    out = run_submit(ROOT, 4, f"strategy={kind} num_rounds={rounds} {overrides}", run_dir,
                     flower_env(work / f"home-{kind}", isolated_ports=True), timeout=7200)
    if out.returncode != 0:
        sys.exit(f"the {kind} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    return read_metrics(run_dir / "metrics.jsonl")


def per_client(rows: list[dict], key: str) -> float:
    """Mean per client and round of `key` over rounds 2.. (round 1 carries the setup)."""
    values = [c[key] for r in rows[2:] or rows[1:] for c in r["clients"].values()]
    return statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kseed", default="", help="extra overrides for the FedKSeed run")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_client(*args.worker)))
        return
    print("[bench] one client round of each, fresh processes ...", flush=True)
    flora = run_worker(__file__, "--worker", "flora", "")
    kseed = run_worker(__file__, "--worker", "fedkseed", args.kseed)
    print(f"\n{'client':10}{'peak RSS MiB':>14}{'s/step':>9}{'steps':>7}{'uploaded values':>17}")
    for name, r in (("flora", flora), ("fedkseed", kseed)):
        print(f"{name:10}{r['peak']:>14.0f}{r['s_per_step']:>9.2f}{r['steps']:>7}"
              f"{r['trainable']:>17}")
    print(f"FedKSeed / FLoRA: peak RSS {kseed['peak'] / flora['peak']:.2f}x, s/step "
          f"{kseed['s_per_step'] / flora['s_per_step']:.2f}x")
    for label, r in kseed["replay"].items():
        print(f"replay, {label}: {r['seeds']} seeds in {r['seconds']:.2f} s")

    steps = max(1, round(flora["steps"] * flora["s_per_step"] / kseed["s_per_step"]))
    print(f"\n[bench] federated, {args.rounds} rounds each; FedKSeed gets {steps} steps per round "
          f"(equal client time) ...", flush=True)
    work = ROOT / "runs" / "bench-kseed" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    rows = {"flora": federated("flora", "", args.rounds, work),
            "fedkseed": federated("fedkseed", f"strategy.steps={steps} {args.kseed}",
                                  args.rounds, work)}
    print(f"\n{'round':>5}{'flora loss':>12}{'fedkseed loss':>15}")
    for a, b in zip(rows["flora"], rows["fedkseed"]):
        print(f"{a['round']:>5}{a['eval-loss']:>12.4f}{b['eval-loss']:>15.4f}")
    for key in ("bytes-up", "bytes-down"):
        f, k = per_client(rows["flora"], key), per_client(rows["fedkseed"], key)
        print(f"{key} per client and round (rounds 2..): flora {f / 1024:.1f} KiB, fedkseed "
              f"{k / 1024:.2f} KiB ({k / f:.5f}x)")
    train = {n: statistics.fmean(c["train-seconds"] for r in rs[1:] for c in r["clients"].values())
             for n, rs in rows.items()}
    print(f"client train seconds per round: flora {train['flora']:.1f}, fedkseed "
          f"{train['fedkseed']:.1f}; final held-out loss: flora "
          f"{rows['flora'][-1]['eval-loss']:.4f}, fedkseed {rows['fedkseed'][-1]['eval-loss']:.4f}"
          f" (base {rows['flora'][0]['eval-loss']:.4f})")
    print(f"runs: {work}")


if __name__ == "__main__":
    main()
