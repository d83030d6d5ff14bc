"""Client benchmark, all figures measured in this one run (the machines are noisy):

1. The same SmolLM2 client training steps with a 4-bit NF4 base vs a full-precision base
   (`model.quantization=none`): seconds per step and peak RSS, each in its own process
   (peak RSS is a per-process high-water mark), printed as ratios.
2. The federation's overhead: wall time of a real `flwr run` simulation (K clients, R rounds,
   FLoRA) vs a bare Python loop doing the same client training, aggregation and server
   evaluation with no Flower at all.

    .venv/bin/python scripts/bench_client.py                 # defaults: 8 steps, 2x2
    .venv/bin/python scripts/bench_client.py --steps 20 --clients 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import run_worker

from fedapp.tools.submit import flower_env, run_submit


def worker_steps(quantization: str, steps: int) -> dict:
    """In a fresh process: load the base, train `steps` LoRA steps, report time and memory."""
    import dataclasses

    from fedapp.client.round import run_round
    from fedapp.config import build_strategy, compose_config
    from fedapp.llm.model import cached_base
    from fedapp.llm.train import peak_rss_mb
    from strategies.base import ClientIdentity

    cfg = compose_config(f"model.quantization={quantization}")
    strategy = build_strategy(cfg, {})
    order = dataclasses.replace(strategy.order_for(1, ClientIdentity("partition-0", 0)),
                                local_steps=2, seed=0)  # batch order as in earlier benches
    start = time.perf_counter()
    cached_base(strategy.setup.model_path, quantization, "cpu")
    load_s = time.perf_counter() - start
    run_round(strategy.setup, order, 0, 4, {}, device="cpu")  # warm-up: data, allocator, kernels
    metrics = run_round(strategy.setup, dataclasses.replace(order, local_steps=steps), 0, 4, {},
                        device="cpu").metrics
    return {"quantization": quantization, "load-seconds": load_s,
            "seconds-per-step": metrics["train-seconds"] / steps, "peak-rss-mb": peak_rss_mb()}


def worker_bare(overrides: str) -> dict:
    """The federated computation without Flower: same clients, same math, same evaluation."""
    from flwr.app import ArrayRecord

    from fedapp.client.round import run_round
    from fedapp.config import build_strategy, compose_config, data_spec
    from fedapp.llm.model import cached_base, cached_tokenizer
    from fedapp.server.evaluate import evaluate_adapter, heldout_examples, target_module_shapes
    from strategies.base import ClientIdentity
    from strategies.lora_math import LoraUpdate, split_factors

    start = time.perf_counter()
    cfg = compose_config(overrides)
    base = cached_base(cfg.model.path, cfg.model.quantization, "cpu")
    tokenizer = cached_tokenizer(cfg.model.path)
    examples = heldout_examples(data_spec(cfg), tokenizer, cfg.train.max_length,
                                cfg.eval.max_examples)
    strategy = build_strategy(cfg, target_module_shapes(base, list(cfg.lora.target_modules)))
    clients = [ClientIdentity(f"partition-{i}", i) for i in range(cfg.scenario.num_clients)]
    arrays = ArrayRecord()
    losses = [evaluate_adapter(base, *strategy.global_adapter(arrays), examples,
                               cfg.eval.batch_size, tokenizer.pad_token_id)["eval-loss"]]
    for server_round in range(1, cfg.num_rounds + 1):
        updates = []
        for client in clients:
            order = strategy.order_for(server_round, client)
            result = run_round(strategy.setup, order, client.partition_id, len(clients),
                               arrays.to_torch_state_dict(), device="cpu")
            updates.append(LoraUpdate(split_factors(result.state), order.scaling,
                                      result.metrics["num-examples"]))
        arrays, _ = strategy.aggregate_updates(server_round, updates)
        losses.append(evaluate_adapter(base, *strategy.global_adapter(arrays), examples,
                                       cfg.eval.batch_size, tokenizer.pad_token_id)["eval-loss"])
    return {"wall-seconds": time.perf_counter() - start, "eval-losses": losses}


def flwr_wall(overrides: str, clients: int) -> float:
    """Wall seconds of `flwr run` (local simulation SuperLink started and stopped by us)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = flower_env(f"{tmp}/flwr-home", isolated_ports=True)
        start = time.perf_counter()
        out = run_submit(ROOT, clients, overrides, f"{tmp}/run", env)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(f"flwr run failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
        return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per client")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, arg = args.worker
        result = worker_steps(arg, args.steps) if kind == "steps" else worker_bare(arg)
        print(json.dumps(result))
        return

    print(f"[bench] 1/3: {args.steps} training steps, 4-bit NF4 base", flush=True)
    nf4 = run_worker(__file__, "--steps", str(args.steps), "--worker", "steps", "nf4")
    print(f"[bench] 2/3: {args.steps} training steps, full-precision base", flush=True)
    full = run_worker(__file__, "--steps", str(args.steps), "--worker", "steps", "none")
    overrides = (f"scenario.num_clients={args.clients} num_rounds={args.rounds} "
                 f"train.local_steps={args.steps} scenario.min_train_nodes={args.clients}")
    print(f"[bench] 3/3: {args.clients} clients x {args.rounds} rounds: bare loop, then flwr run",
          flush=True)
    bare = run_worker(__file__, "--worker", "bare", overrides)
    flwr = flwr_wall(overrides, args.clients)

    print("\nclient training step (SmolLM2-135M, LoRA r=4 on q/k/v/o, batch 4, seq <= 128)")
    print(f"{'':14}{'s/step':>10}{'peak RSS MiB':>15}{'load s':>9}")
    for row in (nf4, full):
        print(f"{row['quantization']:14}{row['seconds-per-step']:>10.3f}"
              f"{row['peak-rss-mb']:>15.0f}{row['load-seconds']:>9.1f}")
    print(f"ratio none/nf4: time {full['seconds-per-step'] / nf4['seconds-per-step']:.2f}x, "
          f"peak RSS {full['peak-rss-mb'] / nf4['peak-rss-mb']:.2f}x")
    print(f"\nfederation overhead ({args.clients} clients x {args.rounds} rounds x "
          f"{args.steps} steps, FLoRA, with server evaluation)")
    print(f"bare loop {bare['wall-seconds']:.1f} s, flwr run {flwr:.1f} s: "
          f"ratio flwr/bare {flwr / bare['wall-seconds']:.2f}x")


if __name__ == "__main__":
    main()
