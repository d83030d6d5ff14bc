"""Server-side aggregation at 7B shape, timed against a plain copy of the same bytes, one run.

`--clients` (50) clients upload a LoRA of a 7B-shaped model: `--layers` (32) layers,
q_proj and v_proj, in = out = `--width` (4096), ranks drawn from 8..32 (seeded), fp16 as on
the wire. Each step runs in a fresh process that first builds the uploads (fp16, no
temporaries), then is timed; `--repeats` processes per step, alternating, the fastest kept:

    copy              the uploads cloned: the bytes any aggregation must at least touch
    flora-stack       FLoRA's round update as the server forms it: `wire_stack`, the
                      uploads concatenated per module at wire precision plus one float64
                      coefficient per stacked row; exact (Δ = B diag(c) A)
    flora-stack-f64   the same stack materialised in float64 (`stack_scaled`), as the
                      server formed it until the wire stack: 4x the bytes written
    flora-recompress  next_global from the wire stack: a rank-`--budget` global with the
                      stack appended, re-compressed to the budget (per module: float64
                      copy, QR + SVD, one thread)
    flora-recompress-f64  the same from the float64 stack (the previous server path)
    fedit             FedIT's factor average (every client at rank 16 for this one)
    zeropad           zero-padding to the largest rank, averaged
    flexlora          FLoRA's stack (float32) truncated to the budget

Printed per step: seconds, ratio to `copy`, the peak RSS above what holding the uploads
takes, and for re-compression the seconds per module and the relative error the budget
drops.

    .venv/bin/python scripts/bench_aggregate.py                    # 50 clients, 7B shape
    .venv/bin/python scripts/bench_aggregate.py --clients 4 --layers 2 --width 256
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import run_worker

STEPS = ("copy", "flora-stack", "flora-stack-f64", "flora-recompress", "flora-recompress-f64",
         "fedit", "zeropad", "flexlora")


def rss_mb() -> float:
    """Resident set size now, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's own peak RSS, MiB (VmHWM; ru_maxrss would carry the parent's peak
    through fork and exec). Read here, not from fedapp.llm.memory: the server's aggregation
    is measured without the client stack that importing fedapp.llm loads."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def uploads(clients: int, layers: int, width: int, seed: int, rank: int | None = None):
    """LoraUpdates of `clients` clients over 2·`layers` modules (out = in = width), fp16."""
    import torch

    from strategies.lora_math import LoraUpdate

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(clients):
        r = rank or rng.randint(8, 32)
        factors = {f"model.layers.{i}.self_attn.{m}": (
            torch.randn(r, width, generator=gen, dtype=torch.float16) * 0.01,
            torch.randn(width, r, generator=gen, dtype=torch.float16) * 0.01)
            for i in range(layers) for m in ("q_proj", "v_proj")}
        out.append(LoraUpdate(factors, scaling=2.0, weight=float(rng.randint(20, 200))))
    return out


def worker(step: str, clients: int, layers: int, width: int, budget: int, seed: int) -> dict:
    import torch

    from strategies.lora_math import (
        fedavg_factors,
        next_global,
        scaled_parts,
        stack_factors,
        stack_scaled,
        truncate_factors,
        wire_stack,
        zeropad_factors,
    )

    torch.set_num_threads(torch.get_num_threads())
    updates = uploads(clients, layers, width, seed, rank=16 if step == "fedit" else None)
    extra: dict = {"ranks": sum(u.rank for u in updates) / len(updates),
                   "upload_mb": sum(a.numel() + b.numel() for u in updates
                                    for a, b in u.factors.values()) * 2 / 2**20}
    prev = None
    if step.startswith("flora-recompress"):  # untimed: the stack, and a global at the budget
        prev = {m: (a.to(torch.float16), b.to(torch.float16)) for m, (a, b) in
                stack_scaled(scaled_parts(updates[:budget // 16 or 1], torch.float16)).items()}
        prev, _ = truncate_factors(prev, budget)
        parts = scaled_parts(updates, torch.float16)
        delta = stack_scaled(parts) if step.endswith("f64") else wire_stack(parts)
    held, start = rss_mb(), time.perf_counter()
    if step == "copy":
        result = [(a.clone(), b.clone()) for u in updates for a, b in u.factors.values()]
    elif step == "flora-stack":
        result = wire_stack(scaled_parts(updates, torch.float16))
    elif step == "flora-stack-f64":
        result = stack_scaled(scaled_parts(updates, torch.float16))
    elif step.startswith("flora-recompress"):
        result, dropped = next_global(prev, delta, budget, torch.float16)
        extra["dropped"] = dropped
    elif step == "fedit":
        result = fedavg_factors(updates)
    elif step == "zeropad":
        result = zeropad_factors(updates)
    else:
        result, dropped = truncate_factors(stack_factors(updates), budget)
        extra["dropped"] = dropped
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    del result
    return {"seconds": seconds, "above_held_mb": max(0.0, peak - held), "held_mb": held,
            "modules": 2 * layers, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=64, help="FLoRA's rank budget")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = args.steps.split(",")
    if unknown := sorted(set(steps) - set(STEPS)):
        sys.exit(f"--steps names {unknown}; allowed: {list(STEPS)}")
    if min(args.clients, args.layers, args.width, args.budget, args.repeats) < 1:
        sys.exit("--clients, --layers, --width, --budget and --repeats must be >= 1")
    runs: dict[str, list[dict]] = {s: [] for s in steps}
    for repeat in range(args.repeats):
        for step in steps:
            print(f"[{repeat + 1}/{args.repeats}] {step} ...", file=sys.stderr, flush=True)
            runs[step].append(run_worker(__file__, "--worker", step, str(args.clients),
                                         str(args.layers), str(args.width),
                                         str(args.budget), str(args.seed)))
    best = {s: min(rs, key=lambda r: r["seconds"]) for s, rs in runs.items()}
    first = next(iter(best.values()))
    print(f"Aggregation of {args.clients} clients x {first['modules']} modules ({args.width} x "
          f"{args.width}, mean rank {first['ranks']:.1f}, {first['upload_mb']:.1f} MiB of fp16 "
          f"uploads), rank budget {args.budget}; fastest of {args.repeats} fresh processes")
    print(f"{'step':<22}{'seconds':>9}{'x copy':>9}{'peak above uploads MiB':>24}  notes")
    copy = best.get("copy", {}).get("seconds")
    for step, r in best.items():
        notes = ""
        if "dropped" in r:
            notes = (f"{r['seconds'] / r['modules']:.3f} s per module, relative error "
                     f"dropped {r['dropped']:.3g}")
        if step == "fedit":
            notes += "every client at rank 16"
        ratio = f"{r['seconds'] / copy:.2f}" if copy else "-"
        print(f"{step:<22}{r['seconds']:>9.3f}{ratio:>9}{r['above_held_mb']:>24.0f}  {notes}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, step, clients, layers, width, budget, seed = sys.argv
        print(json.dumps(worker(step, int(clients), int(layers), int(width), int(budget),
                                int(seed))))
    else:
        main()
