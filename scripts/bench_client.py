"""Client benchmark, all figures measured in this one run (the machines are noisy):

1. Where a client's memory goes: each variant of one client (SmolLM2-135M, LoRA r8 on
   q/k/v/o, batch 4, seq <= 128) in its own fresh process, its peak RSS split into
   interpreter + imports, the data pipeline, base weights, LoRA + optimizer state,
   activations kept for the backward pass, the rest of the step (logits/loss, temporaries)
   and what stays resident besides (allocator, caches); with seconds per step.
   Variants: 4-bit NF4 and full precision (`model.quantization=none`), each with and
   without the memory-over-speed options ("lean": gradient checkpointing, release_memory,
   fp32_compute), and each of those alone; 4-bit with the token embedding / output head in
   NF4 too (`nf4-embeddings`, "nf4-emb"), with and without, and with checkpointing alone or
   checkpointing + release_memory in bf16 (both precisions), or checkpointing + fp32 compute
   (4-bit); 4-bit with the plain loss (what
   the chunked loss saves); 4-bit pruned to FedSpine's
   ratio 0.5 (what pruning buys): in the client's process (a device's first pruned round,
   the unpruned model scored and sliced first) and "stored" (a later round: the pruned
   copy a helper process stored, loaded as `fedapp.client.store` loads it), each printed
   beside the unpruned one overall, above the imports + data floor, above the "runtime
   floor" (the same client training a one-layer, 64-wide model: what any training process
   holds) and part by part; a first run (nothing prepared: the partition and the 4-bit
   copy are made by helper processes) and the client quantising in its own process; a
   Gemma-3-270M-shaped model (262k-token vocabulary, random weights) with the chunked and the
   plain loss. Every variant runs on the app's allocator (jemalloc where installed,
   `fedapp.tools.allocator`); the "glibc" variants repeat four of them on glibc's malloc;
   the "pad32" ones pad batches to a multiple of 32 tokens (`train.pad_multiple`).
2. The federation's overhead: a real `flwr run` simulation (K clients, R rounds, FLoRA) vs a
   bare Python loop doing the same client training, aggregation and server evaluation with
   no Flower: start-up and steady per-round seconds apart.

    .venv/bin/python scripts/bench_client.py                  # everything, ≈12 min here
    .venv/bin/python scripts/bench_client.py --part memory --steps 4
    .venv/bin/python scripts/bench_client.py --part memory --variants "262k vocab,262k vocab plain"
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_client_parts import (
    memory_parts,
    prune_here,
    saved_activation_bytes,
    worker_prune,
)
from bench_client_report import print_memory, print_ratios
from bench_common import run_worker

from fedapp.tools.allocator import allocator_env

MiB = 2**20
VARIANTS = {  # name -> (quantization, options); "lean": checkpointing + release_memory +
    # fp32_compute (train.*: every memory-over-speed option; fp32 compute is a no-op for none)
    "nf4": ("nf4", ""),
    "none": ("none", ""),
    "nf4 lean": ("nf4", "ckpt pin fp32"),
    "none lean": ("none", "ckpt pin fp32"),
    "nf4-emb lean": ("nf4-embeddings", "ckpt pin fp32"),
    "nf4-emb": ("nf4-embeddings", ""),
    # lean without fp32_compute: where bf16 matmuls are fast (AVX512-BF16 / AMX CPUs)
    "nf4-emb ckpt+release": ("nf4-embeddings", "ckpt pin"),
    "none ckpt+release": ("none", "ckpt pin"),
    "nf4-emb+ckpt": ("nf4-embeddings", "ckpt"),  # checkpointing alone, bf16 where fast
    "nf4-emb ckpt+fp32": ("nf4-embeddings", "ckpt fp32"),  # lean without release_memory
    "nf4 ckpt+fp32": ("nf4", "ckpt fp32"),
    # batches padded to a multiple of 32 tokens (train.pad_multiple): 4 shapes, not ~100
    "nf4 pad32": ("nf4", "pad32"),
    "nf4-emb+ckpt pad32": ("nf4-embeddings", "ckpt pad32"),
    "none+ckpt pad32": ("none", "ckpt pad32"),
    "none+ckpt": ("none", "ckpt"),
    "nf4+ckpt": ("nf4", "ckpt"),
    "nf4+release": ("nf4", "pin"),
    "nf4+fp32": ("nf4", "fp32"),
    "nf4 plain loss": ("nf4", "plain"),
    "nf4 pruned 0.5": ("nf4", "prune"),
    "nf4 pruned lean": ("nf4", "prune ckpt pin fp32"),
    "nf4-emb pruned 0.5": ("nf4-embeddings", "prune"),
    # a later round: the device loads the copy it stored after pruning (fedapp.client.store)
    "nf4 pruned 0.5 stored": ("nf4", "prune stored"),
    "nf4-emb pruned 0.5 stored": ("nf4-embeddings", "prune stored"),
    "nf4 1st run": ("nf4", "fresh"),
    "nf4 quantised here": ("nf4", "inproc"),
    # the floor of any training process: the same client with a one-layer, 64-wide model
    # (SmolLM2's vocabulary): imports, data, and what autograd, oneDNN and the allocator
    # hold once a step has run, with next to no model
    "runtime floor": ("nf4-embeddings", "tiny"),
    "262k vocab": ("nf4", "bigvocab"),
    "262k vocab plain": ("nf4", "bigvocab plain"),
    # the same clients on glibc's malloc (the others run on the app's allocator, jemalloc
    # where installed: fedapp/tools/allocator.py)
    "nf4 glibc": ("nf4", "glibc"),
    "none glibc": ("none", "glibc"),
    "nf4-emb+ckpt glibc": ("nf4-embeddings", "ckpt glibc"),
    "none+ckpt glibc": ("none", "ckpt glibc"),
}
# The large-vocabulary variants: a Gemma-3-270M-shaped text model (262,144 tokens, hidden 640,
# 18 layers) built from its config with random weights (memory and time need the shapes, not
# the values), fed SmolLM2's tokens; where the full-vocabulary logits hurt most.
BIG_VOCAB = {"vocab_size": 262_144, "hidden_size": 640, "intermediate_size": 2048,
             "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
             "head_dim": 256, "query_pre_attn_scalar": 256, "max_position_embeddings": 2048,
             "sliding_window": 512, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}


def random_model(name: str, family: str, shape: dict) -> Path:
    """A model folder of `family` ("gemma3": Gemma3ForCausalLM, else Llama) with `shape`
    and random weights, SmolLM2's tokenizer (and its vocabulary unless `shape` says),
    built once under the cache as `bench/<name>`."""
    from fedapp.llm.model import cache_dir, load_tokenizer, resolve_model_path

    folder = cache_dir() / "bench" / name
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    config_class, model_class = (Gemma3TextConfig, Gemma3ForCausalLM) if family == "gemma3" \
        else (LlamaConfig, LlamaForCausalLM)
    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = config_class(**{"vocab_size": len(tokenizer), **shape},
                          pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.eos_token_id)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    model_class(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def big_vocab_model() -> Path:
    """The large-vocabulary model folder (Gemma-3-270M-shaped, random weights)."""
    return random_model("gemma3-262k-random", "gemma3", BIG_VOCAB)


def tiny_model() -> Path:
    """The runtime-floor model folder (one layer, hidden 64, SmolLM2's vocabulary)."""
    return random_model("llama-1x64-random", "llama", TINY)


def fresh_cache() -> None:
    """Point this process at an empty cache that shares only the converted model."""
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    (cache / "models").symlink_to(Path(os.environ.get(
        "FEDAPP_CACHE", Path.home() / ".cache" / "fedapp")) / "models")
    os.environ["FEDAPP_CACHE"] = str(cache)


def worker_client(quantization: str, options: str, steps: int) -> dict:
    """One client in this fresh process; its peak RSS split into parts (MiB), s/step."""
    from fedapp.llm import memory

    stored = run_worker(__file__, "--worker", "prune", quantization) \
        if "stored" in options else None  # in its own process: none of it counted here
    if "fresh" in options:  # a first run: nothing prepared yet (the converted model is kept)
        fresh_cache()
    interpreter = memory.rss_mb()
    import bitsandbytes  # noqa: F401  the client process imports all of these
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from fedapp.client.round import local_data
    from fedapp.client.store import load_copy
    from fedapp.config import build_strategy, compose_config
    from fedapp.llm.adapters import attach_lora
    from fedapp.llm.data import collate
    from fedapp.llm.model import compute_in_fp32, load_base
    from fedapp.llm.train import set_gradient_checkpointing, train_steps

    rss = {"interpreter": interpreter, "imports": memory.rss_mb()}
    if "pin" in options:  # train.release_memory
        memory.return_freed_memory()
    loss = "plain" if "plain" in options else "chunked"
    model_path = f"model=hf model.path={big_vocab_model()} " if "bigvocab" in options else \
        f"model=hf model.path={tiny_model()} " if "tiny" in options else ""
    padding = "train.pad_multiple=32 " if "pad32" in options else ""
    strategy = build_strategy(
        compose_config(f"{model_path}{padding}model.quantization={quantization}"), {})
    setup, order = strategy.setup, strategy.make_order(1, 8)
    examples, batches, pad = local_data(setup, order, 0, 4)
    rss["data"] = memory.rss_mb()
    if "inproc" in options:  # quantise from full precision in this process, as before
        os.environ["FEDAPP_PREPARED"] = "0"
    memory.reset_peak()
    start = time.perf_counter()
    base = load_copy(Path(stored["folder"]), quantization, "cpu", setup.target_modules).base \
        if stored \
        else load_base(setup.model_path, quantization, "cpu")
    model = attach_lora(base, 8, order.lora_alpha, list(setup.target_modules), seed=0)
    load = {"seconds": time.perf_counter() - start, "peak": memory.peak_rss_mb()}
    params = stored["params-ratio"] if stored else 1.0
    if "prune" in options and not stored:  # FedSpine's first round, in this process
        params = prune_here(model, [collate(examples[:setup.batch_size], pad)], load)
    set_gradient_checkpointing(model.get_base_model(), "ckpt" in options)
    if "fp32" in options:  # train.fp32_compute
        compute_in_fp32(model)
    train_steps(model, batches, 2, setup.lr, log_every=0, loss=loss)  # warm-up
    model.train()
    activations = saved_activation_bytes(model, next(batches), loss) / MiB
    resident = memory.rss_mb()
    memory.reset_peak()
    timed = train_steps(model, batches, steps, setup.lr, log_every=0, loss=loss)
    peak = memory.peak_rss_mb()
    parts = memory_parts(model, rss, activations, resident, peak)
    return {"quantization": quantization, "options": options, "parts": parts,
            "peak-rss-mb": peak, "seconds-per-step": timed.seconds / steps, "loss": timed.loss,
            "load-seconds": load["seconds"], "load-peak-mb": load["peak"],
            "params-ratio": params, "allocator": memory.allocator(),
            "prune-peak-mb": load.get("prune-peak"), "prune-seconds": load.get("prune-seconds")}


def worker_bare(overrides: str) -> dict:
    """The federated computation without Flower: same clients, same math, same evaluation;
    seconds until round 1 starts and each round's seconds (training, aggregation, eval)."""
    from flwr.app import ArrayRecord

    from fedapp.client.round import run_round
    from fedapp.config import build_strategy, compose_config, data_spec
    from fedapp.llm.adapters import target_module_shapes
    from fedapp.llm.model import cached_base, cached_tokenizer
    from fedapp.server.evaluate import (
        evaluate_adapter,
        heldout_examples,
        heldout_ranking_items,
    )
    from strategies.base import ClientIdentity
    from strategies.lora_math import LoraUpdate, split_factors

    start = time.perf_counter()
    cfg = compose_config(overrides)
    base = cached_base(cfg.model.path, cfg.model.quantization, "cpu")
    tokenizer = cached_tokenizer(cfg.model.path)
    examples = heldout_examples(data_spec(cfg), tokenizer, cfg.train.max_length,
                                cfg.eval.max_examples)
    ranking = (heldout_ranking_items(data_spec(cfg), tokenizer, cfg.train.max_length,
                                     cfg.eval.ranking_examples, cfg.eval.ranking_k,
                                     cfg.eval.ranking_score)
               if cfg.eval.ranking_examples else None)
    strategy = build_strategy(cfg, target_module_shapes(base, list(cfg.lora.target_modules)))
    clients = [ClientIdentity(f"partition-{i}", i) for i in range(cfg.scenario.num_clients)]
    arrays = ArrayRecord()

    def evaluate() -> float:
        return evaluate_adapter(base, *strategy.global_adapter(arrays), examples,
                                cfg.eval.batch_size, tokenizer.pad_token_id,
                                ranking_items=ranking)["eval-loss"]

    losses, rounds, training = [evaluate()], [], []
    for server_round in range(1, cfg.num_rounds + 1):
        round_start, updates, trained = time.perf_counter(), [], 0.0
        for client in clients:
            order = strategy.order_for(server_round, client)
            result = run_round(strategy.setup, order, client.partition_id, len(clients),
                               arrays.to_torch_state_dict(), device="cpu")
            updates.append(LoraUpdate(split_factors(result.state), order.scaling,
                                      result.metrics["num-examples"]))
            trained += result.metrics["train-seconds"]
        arrays, _ = strategy.aggregate_updates(server_round, updates)
        losses.append(evaluate())
        rounds.append(time.perf_counter() - round_start)
        training.append(trained)
    return {"wall-seconds": time.perf_counter() - start, "round-seconds": rounds,
            "train-seconds": training, "eval-losses": losses}


def flwr_run(overrides: str, clients: int) -> dict:
    """`flwr run` (its own local simulation SuperLink): total wall seconds, and each round's
    seconds from the run's metrics (the server's clock, evaluation included)."""
    from fedapp.server.report import read_metrics
    from fedapp.tools.submit import flower_env, run_submit

    with tempfile.TemporaryDirectory() as tmp:
        env = flower_env(f"{tmp}/flwr-home", isolated_ports=True)
        start = time.perf_counter()
        out = run_submit(ROOT, clients, overrides, f"{tmp}/run", env)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(f"flwr run failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
        rows = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    marks = [r["wall-seconds"] for r in rows]
    return {"wall-seconds": wall, "round-seconds": [b - a for a, b in itertools.pairwise(marks)],
            "train-seconds": [sum(c.get("train-seconds", 0.0) for c in r.get("clients", {}).values())
                              for r in rows[1:]]}


def print_overhead(bare: dict, flwr: dict, args: argparse.Namespace) -> None:
    def steady(per_round: list[float]) -> float:
        """The mean of rounds 2.. (round 1 alone when there is no other)."""
        later = per_round[1:] or per_round
        return sum(later) / len(later)

    def split(run: dict) -> tuple[float, float]:
        """(steady seconds per round, start-up: the rest of the wall time)."""
        per = steady(run["round-seconds"])
        return per, run["wall-seconds"] - per * len(run["round-seconds"])

    (bare_round, bare_start), (flwr_round, flwr_start) = split(bare), split(flwr)
    print(f"\nfederation overhead ({args.clients} clients x {args.rounds} rounds x "
          f"{args.steps} steps, FLoRA, server evaluation every round)")
    print(f"{'':12}{'wall s':>9}{'start-up s':>12}{'per round s':>13}   rounds")
    for name, run, start, per in (("bare loop", bare, bare_start, bare_round),
                                  ("flwr run", flwr, flwr_start, flwr_round)):
        print(f"{name:12}{run['wall-seconds']:>9.1f}{start:>12.1f}{per:>13.1f}   "
              + " ".join(f"{s:.1f}" for s in run["round-seconds"]))
    print(f"ratio flwr/bare: per round (rounds 2..) {flwr_round / bare_round:.2f}x, start-up "
          f"{flwr_start / bare_start:.2f}x, whole wall "
          f"{flwr['wall-seconds'] / bare['wall-seconds']:.2f}x")
    bare_train, flwr_train = steady(bare["train-seconds"]), steady(flwr["train-seconds"])
    print(f"of a steady round, the clients' own training (sum of train-seconds): bare "
          f"{bare_train:.1f} s, flwr {flwr_train:.1f} s ({flwr_train / bare_train:.2f}x);"
          f" the rest (messages, set-up, aggregation, evaluation): bare "
          f"{bare_round - bare_train:.1f} s, flwr {flwr_round - flwr_train:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "memory", "overhead"), default="all")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per client")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"memory part: comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, arg = args.worker
        result = (worker_client(*VARIANTS[arg], args.steps) if kind == "client"
                  else worker_prune(arg) if kind == "prune" else worker_bare(arg))
        print(json.dumps(result))
        return
    if args.part in ("all", "memory"):
        names = [v.strip() for v in args.variants.split(",")]
        if unknown := [v for v in names if v not in VARIANTS]:
            sys.exit(f"--variants: {unknown} unknown; allowed: {list(VARIANTS)}")
        if any("bigvocab" in VARIANTS[v][1] for v in names):
            print(f"[bench] large-vocabulary model: {big_vocab_model()}", flush=True)
        if any("tiny" in VARIANTS[v][1] for v in names):
            print(f"[bench] runtime-floor model: {tiny_model()}", flush=True)
        rows = {}
        for i, name in enumerate(names, 1):
            print(f"[bench] {i}/{len(names)}: client '{name}', {args.steps} steps", flush=True)
            glibc = {"FEDAPP_ALLOCATOR": "system"} if "glibc" in VARIANTS[name][1] else {}
            rows[name] = run_worker(__file__, "--steps", str(args.steps), "--worker", "client",
                                    name, env=allocator_env({**os.environ, **glibc}))
        print_memory(rows, args.steps)
        print_ratios(rows)
    if args.part in ("all", "overhead"):
        overrides = (f"scenario.num_clients={args.clients} num_rounds={args.rounds} "
                     f"train.local_steps={args.steps} scenario.min_train_nodes={args.clients}")
        print(f"[bench] {args.clients} clients x {args.rounds} rounds: bare loop, then flwr run",
              flush=True)
        bare = run_worker(__file__, "--worker", "bare", overrides)
        print_overhead(bare, flwr_run(overrides, args.clients), args)


if __name__ == "__main__":
    main()
