"""FedBiOT against FLoRA: what a device holds and spends, and what the full model gains.

`--part client` measures one device's training on SmolLM2-135M 4-bit (batch 4, 128 tokens,
LoRA r8 on the target modules), each variant in fresh processes (alternating, median):

    full-all    the full model, LoRA on every layer (a FLoRA device)
    full-top    the full model, LoRA on the top `--adapter-layers` only (FedBiOT's trainable
                part, without the emulator)
    emulator    FedBiOT's device: the emulator (the layers the server picks by LLM-Drop on
                the public data, cut from the 4-bit checkpoint; the others never loaded)
                with LoRA on the top `--adapter-layers`

Printed: peak RSS of the process (loading included), seconds to load, median s/step, the
base weights held (MiB) and the LoRA parameters, with ratios to full-all.

`--part federated` runs, per seed, real `flwr run` simulations (`--clients` clients, same
data, rounds and server evaluation: the held-out loss of the full model with the global
adapter plugged in):

    flora        every device LoRA r8 on every layer of the full model, `--local-steps`
    fedbiot      the emulator + adapter, the same local steps (less compute per step)
    fedbiot-eq   the same with local steps scaled so that its client compute matches
                 FLoRA's (by the median measured seconds per client step, first seed, or
                 `--eq-steps` from the fresh-process ratio of `--part client`)

Printed per method: final held-out loss (mean and per seed), client s/step and peak RSS as
the runs reported them, total client train-seconds, MB up and down per client and round,
and the emulator's alignment (KL(full ‖ emulator) before/after, seconds). Writes `<out>/fedbiot.md`
and `loss.png`.

    .venv/bin/python scripts/bench_fedbiot.py --part client
    .venv/bin/python scripts/bench_fedbiot.py --part federated --seeds 0 1
    .venv/bin/python scripts/bench_fedbiot.py --into runs/bench-fedbiot/<stamp>  # continue
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import load_runs, plot_loss, run_worker
from bench_fedspine import federated

MODEL = "smollm2-135m-instruct"
VARIANTS = ("full-all", "full-top", "emulator")
METHODS = ("flora", "fedbiot", "fedbiot-eq")


def select(adapter_layers: int, keep: int) -> dict:
    """The emulator's layers as the server picks them (fedapp.server.emulator), and its
    checkpoint cut once (as a device does on first use; its 4-bit copy is made by the first
    worker that loads it)."""
    from fedapp.llm.emulator import emulator_folder
    from fedapp.llm.model import load_base, load_tokenizer
    from fedapp.pruning.importance import llm_drop_importance
    from fedapp.server.emulator import as_batches, public_blocks
    from strategies.biot_math import emulator_layers, layer_scores

    base = load_base(MODEL, "nf4", "cpu")
    batches = as_batches(public_blocks(load_tokenizer(MODEL), 128, 32), 4)
    n = base.config.num_hidden_layers
    layers = emulator_layers(layer_scores(llm_drop_importance(base, batches).blocks, n),
                             adapter_layers, keep)
    emulator_folder(MODEL, layers)
    return {"layers": list(layers), "num_layers": n}


def worker(variant: str, layers: str, adapter_layers: int, steps: int, targets: str) -> dict:
    """Load the variant's model, train `steps` steps (after one warm-up); its costs."""
    import torch

    from fedapp.llm.adapters import target_module_shapes, with_lora
    from fedapp.llm.emulator import load_emulator
    from fedapp.llm.loss import lm_loss
    from fedapp.llm.memory import peak_rss_mb
    from fedapp.llm.model import load_base
    from strategies.pipe_math import module_layers

    start = time.perf_counter()
    kept = tuple(int(i) for i in layers.split(","))
    base = load_emulator(MODEL, "nf4", "cpu", kept) if variant == "emulator" \
        else load_base(MODEL, "nf4", "cpu")
    load_seconds = time.perf_counter() - start
    names = targets.split(",")
    n = max(kept) + 1
    top = {m: 8 for m, i in module_layers(target_module_shapes(base, names)).items()
           if i >= n - adapter_layers}
    weights = sum(t.numel() * t.element_size() for t in base.state_dict().values()) / 2**20
    ids = torch.randint(0, base.config.vocab_size, (4, 128),
                        generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with with_lora(base, 8, 16.0, names, 0, ranks=None if variant == "full-all" else top
                   ) as model:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            tick = time.perf_counter()
            lm_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - tick)
    return {"peak_mb": peak_rss_mb(),
            "load_s": load_seconds, "s_step": statistics.median(times[1:]),
            "weights_mb": weights, "lora_params": sum(p.numel() for p in params)}


def client_part(args: argparse.Namespace) -> None:
    print("selecting the emulator's layers ...", file=sys.stderr, flush=True)
    chosen = run_worker(__file__, "--select", str(args.adapter_layers), str(args.keep))
    layers = ",".join(map(str, chosen["layers"]))
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            print(f"[{repeat + 1}/{args.repeats}] {variant} ...", file=sys.stderr, flush=True)
            runs[variant].append(run_worker(__file__, "--worker", variant, layers,
                                            str(args.adapter_layers), str(args.steps),
                                            args.targets))
    rows = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    print(f"SmolLM2-135M 4-bit, batch 4 x 128 tokens, LoRA r8 on {args.targets}; emulator "
          f"layers {layers} ({len(chosen['layers'])} of {chosen['num_layers']}), adapter = top "
          f"{args.adapter_layers}; median of {args.repeats} fresh processes")
    print(f"{'variant':<10}{'peak MiB':>10}{'x':>7}{'load s':>8}{'s/step':>8}{'x':>7}"
          f"{'weights MiB':>13}{'LoRA params':>13}")
    ref = rows["full-all"]
    for variant, r in rows.items():
        print(f"{variant:<10}{r['peak_mb']:>10.0f}{r['peak_mb'] / ref['peak_mb']:>7.2f}"
              f"{r['load_s']:>8.1f}{r['s_step']:>8.3f}{r['s_step'] / ref['s_step']:>7.2f}"
              f"{r['weights_mb']:>13.1f}{int(r['lora_params']):>13}")


def run_methods(args: argparse.Namespace, out: Path) -> None:
    common = (f"num_rounds={args.rounds} scenario.num_clients={args.clients} "
              f"scenario.min_train_nodes={args.clients} {args.eval}")
    biot = (f"strategy=fedbiot strategy.adapter_layers={args.adapter_layers} "
            f"strategy.emulator_layers={args.keep}")
    eq_steps = args.eq_steps

    def run(name: str, overrides: str, seed: int) -> None:
        run_dir = out / f"{name}-seed{seed}"
        if (run_dir / "aggregate.json").exists():  # finished in an earlier call (--out DIR)
            print(f"[bench] {run_dir.name}: kept", flush=True)
            return
        shutil.rmtree(run_dir, ignore_errors=True)
        federated(name, f"{overrides} {common} seed={seed}", run_dir)

    for seed in args.seeds:
        run("flora", f"strategy=flora strategy.ranks=[8] train.local_steps={args.local_steps}",
            seed)
        if eq_steps is None:
            run("fedbiot", f"{biot} train.local_steps={args.local_steps}", seed)  # a client step of the first seed: FLoRA's over FedBiOT's
            ratio = step_seconds(out / f"flora-seed{seed}") / step_seconds(
                out / f"fedbiot-seed{seed}")
            eq_steps = max(1, round(args.local_steps * ratio))
            print(f"[bench] fedbiot-eq: {eq_steps} local steps (median step-time ratio "
                  f"{ratio:.2f})", flush=True)
        run("fedbiot-eq", f"{biot} train.local_steps={eq_steps}", seed)
        run("fedbiot", f"{biot} train.local_steps={args.local_steps}", seed)  # kept for seed 0


def client_rows(run_dir: Path) -> list[dict]:
    from fedapp.server.report import read_metrics

    return [c for r in read_metrics(run_dir / "metrics.jsonl")[1:]
            for c in r.get("clients", {}).values() if c.get("status") == "ok"]


def step_seconds(run_dir: Path) -> float:
    """The median over client rounds of train-seconds / local steps (a median: other work
    on this machine slows some rounds down)."""
    from omegaconf import OmegaConf

    steps = int(OmegaConf.load(run_dir / "config.yaml").train.local_steps)
    return statistics.median(c["train-seconds"] / steps for c in client_rows(run_dir))


def figures_of(run: dict) -> dict[str, float]:
    steps = int(run["cfg"].train.local_steps)
    clients = run["clients"]
    return {"base loss": run["rows"][0]["eval-loss"], "final loss": run["rows"][-1]["eval-loss"],
            "local steps": steps,
            "client s/step": statistics.mean(c["train-seconds"] / steps for c in clients),
            "client train-s total": sum(c["train-seconds"] for c in clients),
            "client peak MiB": max(c["peak-rss-mb"] for c in clients),
            "KB up / client-round": statistics.mean(c["bytes-up"] for c in clients) / 1024,
            "KB down / client-round": statistics.mean(c["bytes-down"] for c in clients) / 1024}


def report(out: Path) -> str:
    runs = load_runs(out)
    for rs in runs.values():  # the clients' rows, for the per-client figures
        for run in rs.values():
            run["clients"] = client_rows(run["dir"])
    if not set(runs) <= set(METHODS) or "flora" not in runs:
        sys.exit(f"{out} holds runs of {sorted(runs)}; allowed: a folder this bench wrote")
    seeds = sorted(set.intersection(*(set(rs) for rs in runs.values())))
    figures = {m: {} for m in runs}
    for method, rs in runs.items():
        for seed in sorted(set(rs) & set(runs["flora"])):
            for k, v in figures_of(rs[seed]).items():
                figures[method].setdefault(k, []).append(v)
    keys = list(figures["flora"])
    lines = [f"# FedBiOT vs FLoRA ({out.name})", "", (
             f"Seeds per method: { {m: sorted(rs) for m, rs in runs.items()} }; mean over seeds "
             "(each seed's value in brackets). Held-out loss: "
             "the full model with the global adapter plugged in, on the server. Client figures "
             "as the client processes reported them (peak RSS of a simulation process: an "
             "upper bound)."), "",
             "| method | " + " | ".join(keys) + " |", "|---" * (1 + len(keys)) + "|"]
    for method, f in figures.items():
        lines.append(f"| {method} | " + " | ".join(
            f"{statistics.mean(v):.4g} {[round(x, 4) for x in v]}" for v in f.values()) + " |")
    lines += ["", "Ratios to FLoRA (mean over seeds):", ""]
    for method in figures:
        if method != "flora":
            lines.append(f"- {method}: " + ", ".join(
                f"{k} {statistics.mean(figures[method][k]) / statistics.mean(figures['flora'][k]):.3f}x"
                for k in keys if statistics.mean(figures["flora"][k])))
    for method, rs in runs.items():
        meta = rs[seeds[0]]["meta"]
        if "emulator-layers" in meta:
            lines.append(f"- {method} emulator (seed {seeds[0]}): layers {meta['emulator-layers']}, "
                         f"adapter {meta['adapter-layers']} top layers; alignment KL "
                         f"{meta['align-kl-before']:.4f} -> {meta['align-kl-after']:.4f} in "
                         f"{meta['align-seconds']:.1f} s")
    text = "\n".join(lines) + "\n"
    (out / "fedbiot.md").write_text(text)
    plot_loss(runs, out / "loss.png", "round", (
        "round", "held-out loss (full model + global adapter)", "FedBiOT vs FLoRA"))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("client", "federated"), default="federated")
    parser.add_argument("--adapter-layers", type=int, default=2)
    parser.add_argument("--keep", type=int, default=21, help="layers the emulator keeps")
    parser.add_argument("--steps", type=int, default=4, help="client: timed steps")
    parser.add_argument("--repeats", type=int, default=2, help="client: processes per variant")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--eval", default="eval.max_examples=50 eval.ranking_examples=0 "
                                          "eval.generate_examples=0")
    parser.add_argument("--eq-steps", type=int, default=None,
                        help="fedbiot-eq's local steps (default: from the runs' median step "
                             "times; on a busy machine give them from `--part client`)")
    parser.add_argument("--report", type=Path, default=None, help="only report this folder")
    parser.add_argument("--into", type=Path, default=None,
                        help="run into this folder, keeping the runs it already finished")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-fedbiot")
    args = parser.parse_args()
    if min(args.adapter_layers, args.keep, args.steps, args.repeats, args.rounds,
           args.clients, args.local_steps) < 1:
        sys.exit("--adapter-layers, --keep, --steps, --repeats, --rounds, --clients and "
                 "--local-steps must be >= 1")
    if args.part == "client":
        client_part(args)
        return
    out = (args.report or args.into or args.out / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if args.report is None:
        out.mkdir(parents=True, exist_ok=True)
        run_methods(args, out)
    print(report(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                                sys.argv[6])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--select":
        print(json.dumps(select(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
