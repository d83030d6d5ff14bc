"""FedPipe against FLoRA with one uniform structure, under `phones_laptops_edge`, measured in
one run; and the cost model FedPipe plans with, fitted to measurements.

`--part costs` trains SmolLM2-135M 4-bit (batch 4, 128 tokens, LoRA r8 on the configured
target modules) with windows of d of its N layers (LoRA on the top d, so the backward stops
there), each in a fresh process, and fits FedPipe's `strategy.costs` by least squares:
peak RSS = fixed + layer·d + lora·P and s/step = forward + backward·d/N (lora_mb_per_mparam
is 16: fp32 weight, gradient and two AdamW moments). Printed beside each measurement.

`--part federated` runs, per seed, two real `flwr run` simulations with the same devices
(phone / laptop / edge: slow-down, memory budget, links), data, rounds, local steps and
server evaluation:

    flora     every device trains LoRA rank `--rank` on every target module of every layer
    fedpipe   each device's window and ranks from its budget (`--step-seconds` per step) and
              its measured importance

Printed per method: simulated seconds until the held-out loss first reaches a target (the
worst final loss of the two, and 95 % of the way from the base's loss to the best final
one), the final loss, MB up and down per client and round, and per device class its
estimated training memory and step time (FedPipe's cost model, for the structure it
trained) against its budget, with the largest peak RSS its client process reported.
Ratios are FLoRA's over FedPipe's. Writes `<out>/fedpipe.md` and `loss.png`.

    .venv/bin/python scripts/bench_fedpipe.py --part costs
    .venv/bin/python scripts/bench_fedpipe.py --part federated --rounds 5 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import load_runs, plot_loss, run_worker
from bench_fedspine import federated

DEPTHS = (30, 20, 10, 4, 1)
METHODS = ("flora", "fedpipe")


def worker(depth: int, steps: int, targets: str) -> dict:
    """Train `steps` steps with a LoRA on the top `depth` layers; peak RSS, s/step."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fedapp.llm.loss import lm_loss
    from fedapp.llm.memory import peak_rss_mb
    from fedapp.llm.model import load_base

    base = load_base("smollm2-135m-instruct", "nf4", "cpu")
    n = base.config.num_hidden_layers
    model = get_peft_model(base, LoraConfig(
        r=8, lora_alpha=16, target_modules=targets.split(","), lora_dropout=0.0,
        layers_to_transform=list(range(n - depth, n)), task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, base.config.vocab_size, (4, 128),
                        generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"depth": depth, "layers": n, "params": sum(p.numel() for p in params),
            "peak_mb": peak_rss_mb(),
            "s_step": statistics.median(times[1:])}


def least_squares(rows: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of y = a + b x."""
    xs, ys = [x for x, _ in rows], [y for _, y in rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in rows) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def fit_costs(steps: int, targets: str, repeats: int) -> None:
    runs: dict[int, list[dict]] = {d: [] for d in DEPTHS}
    for repeat in range(repeats):  # alternating, so drift hits every depth alike
        for depth in DEPTHS:
            print(f"[{repeat + 1}/{repeats}] window of {depth} layers ...", file=sys.stderr,
                  flush=True)
            runs[depth].append(run_worker(__file__, "--worker", str(depth), str(steps),
                                          targets))
    rows = {d: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for d, rs in runs.items()}
    n = int(rows[DEPTHS[0]]["layers"])
    fixed, layer = least_squares([(d, r["peak_mb"] - 16 * r["params"] / 1e6)
                                  for d, r in rows.items()])
    forward, backward = least_squares([(d / n, r["s_step"]) for d, r in rows.items()])
    print(f"SmolLM2-135M 4-bit, batch 4 x 128 tokens, LoRA r8 on {targets}, {steps} steps, "
          f"median of {repeats} processes per window")
    print(f"{'window':>7}{'LoRA params':>13}{'peak MiB':>10}{'fit':>8}{'s/step':>8}{'fit':>8}")
    for d, r in rows.items():
        print(f"{d:>7}{int(r['params']):>13}{r['peak_mb']:>10.0f}"
              f"{fixed + layer * d + 16 * r['params'] / 1e6:>8.0f}{r['s_step']:>8.3f}"
              f"{forward + backward * d / n:>8.3f}")
    print(f"strategy.costs: fixed_mb {fixed:.0f}, layer_mb {layer:.1f}, lora_mb_per_mparam 16, "
          f"forward_s {forward:.3f}, backward_s {backward:.3f}")
    print(f"a window of 1 layer vs all {n}: peak RSS {rows[1]['peak_mb'] / rows[n]['peak_mb']:.2f}x"
          f", s/step {rows[1]['s_step'] / rows[n]['s_step']:.2f}x" if n in rows else "")


def run_methods(args: argparse.Namespace, out: Path) -> None:
    common = (f"scenario=phones_laptops_edge num_rounds={args.rounds} "
              f"train.local_steps={args.local_steps} {args.eval}")
    overrides = {"flora": f"strategy=flora strategy.ranks=[{args.rank}]",
                 "fedpipe": f"strategy=fedpipe strategy.step_seconds={args.step_seconds}"}
    for seed in args.seeds:
        for method in METHODS:
            federated(method, f"{overrides[method]} {common} seed={seed}",
                      out / f"{method}-seed{seed}")


def time_to(rows: list[dict], target: float) -> float:
    return next((r["sim-seconds"] for r in rows[1:] if r["eval-loss"] <= target + 1e-9),
                math.inf)


def device_costs(run: dict, costs: dict) -> dict[str, tuple[float, float, float, float]]:
    """{class: (largest estimated MB, largest estimated s/step on the device, its memory
    budget, largest reported peak RSS MiB)} for the structures the run trained."""
    from transformers import AutoConfig

    from fedapp.llm.model import resolve_model_path
    from strategies.pipe_math import estimate

    devices = run["cfg"].scenario.devices
    n = AutoConfig.from_pretrained(resolve_model_path(run["cfg"].model.path)).num_hidden_layers
    out: dict[str, tuple[float, float, float, float]] = {}
    for row in run["rows"][1:]:
        for c in row["clients"].values():
            if c.get("status") != "ok":
                continue
            device = devices[c["device"]]
            depth = run["meta"].get("depths", {}).get(c["device"], n)
            memory, seconds = estimate(costs, depth, n, int(c["lora-params"]),
                                       float(device.slowdown))
            old = out.get(c["device"], (0.0, 0.0, float(device.memory_mb), 0.0))
            out[c["device"]] = (max(old[0], memory), max(old[1], seconds), old[2],
                                max(old[3], c.get("peak-rss-mb", 0.0)))
    return dict(sorted(out.items()))


def report(out: Path) -> str:
    from omegaconf import OmegaConf

    runs = load_runs(out)
    if set(runs) != set(METHODS):
        sys.exit(f"{out} holds runs of {sorted(runs)}; allowed: a folder this bench wrote "
                 f"with {list(METHODS)}")
    costs = dict(OmegaConf.to_container(runs["fedpipe"][min(runs["fedpipe"])]["cfg"]
                                        .strategy.costs))
    seeds = sorted(set.intersection(*(set(rs) for rs in runs.values())))
    targets = {}  # per seed (each seed draws its own held-out split): its two runs' levels
    for seed in seeds:
        start = runs["flora"][seed]["rows"][0]["eval-loss"]
        finals = [runs[m][seed]["rows"][-1]["eval-loss"] for m in METHODS]
        targets[seed] = {"worst final": max(finals),
                         "95% of the way": start - 0.95 * (start - min(finals))}
    figures: dict[str, dict[str, list[float]]] = {}
    for method, rs in runs.items():
        f: dict[str, list[float]] = {}
        for seed in seeds:
            rows = rs[seed]["rows"]
            f.setdefault("base loss", []).append(rows[0]["eval-loss"])
            clients = [c for r in rows[1:] for c in r["clients"].values() if c["status"] == "ok"]
            values = {f"s to {k}": time_to(rows, t) for k, t in targets[seed].items()}
            values |= {"final loss": rows[-1]["eval-loss"],
                       "sim s total": rows[-1]["sim-seconds"],
                       "KB up / client-round": statistics.mean(c["bytes-up"] for c in clients)
                       / 1024,
                       "KB down / client-round": statistics.mean(c["bytes-down"]
                                                                 for c in clients) / 1024}
            for k, v in values.items():
                f.setdefault(k, []).append(v)
        figures[method] = f
    lines = [f"# FedPipe vs uniform FLoRA under phones_laptops_edge ({out.name})", "",
             f"Seeds {seeds}, each with its own held-out split and targets on the held-out "
             "loss: the worse of the two final losses, and 95 % of the way from the base's "
             "loss to the better one: " + "; ".join(
                 f"seed {s}: {t['worst final']:.4f}, {t['95% of the way']:.4f}"
                 for s, t in targets.items()) + ". Mean over seeds (each seed's value in "
             "brackets).", "", "| method | " + " | ".join(figures["fedpipe"]) + " |",
             "|---" * (1 + len(figures["fedpipe"])) + "|"]
    for method, f in figures.items():
        lines.append(f"| {method} | " + " | ".join(
            f"{statistics.mean(v):.4g} {[round(x, 4) for x in v]}" for v in f.values()) + " |")
    lines += ["", "FLoRA / FedPipe (mean over seeds; for seconds > 1 means FedPipe was sooner):",
              ""]
    for key in figures["fedpipe"]:
        a, b = statistics.mean(figures["flora"][key]), statistics.mean(figures["fedpipe"][key])
        lines.append(f"- {key}: {a / b:.2f}x" if math.isfinite(a / b) and b else
                     f"- {key}: flora {a:.4g}, fedpipe {b:.4g}")
    lines += ["", ("Per device class (first seed): estimated training memory and seconds per "
              "step on the device (FedPipe's cost model for the structure trained) against "
              "its memory budget and `strategy.step_seconds`, and the largest peak RSS its "
              "client process reported (a simulation process also holds other clients' "
              "state: an upper bound):"), ""]
    budget = runs["fedpipe"][seeds[0]]["cfg"].strategy.step_seconds
    for method in METHODS:
        run = runs[method][seeds[0]]
        depths = run["meta"].get("depths", {})
        for device, (memory, seconds, limit, peak) in device_costs(run, costs).items():
            lines.append(f"- {method} {device}: window {depths.get(device, 'all')} layers, "
                         f"{memory:.0f} / {limit:.0f} MB, {seconds:.2f} / {budget} s per step, "
                         f"process peak {peak:.0f} MiB")
    text = "\n".join(lines) + "\n"
    (out / "fedpipe.md").write_text(text)
    plot_loss(runs, out / "loss.png", "sim-seconds", (
        "simulated seconds", "held-out loss", "FedPipe vs uniform FLoRA (phones_laptops_edge)"))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("costs", "federated"), default="federated")
    parser.add_argument("--steps", type=int, default=4, help="costs: timed steps")
    parser.add_argument("--repeats", type=int, default=2, help="costs: processes per window")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8, help="FLoRA's uniform rank")
    parser.add_argument("--step-seconds", type=float, default=3.2,
                        help="FedPipe's per-step time budget on every device")
    parser.add_argument("--eval", default="eval.max_examples=32 eval.ranking_examples=0 "
                                          "eval.generate_examples=0")
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-fedpipe")
    args = parser.parse_args()
    if args.part == "costs":
        fit_costs(args.steps, args.targets, args.repeats)
        return
    out = args.report or args.out / time.strftime("%Y%m%d-%H%M%S")
    if args.report is None:
        out.mkdir(parents=True)
        run_methods(args, out)
    print(report(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
    else:
        main()
