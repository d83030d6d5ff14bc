"""SHED against a random choice of the same number of examples, federated, in one run.

Per seed and per budget (the share of each client's partition it trains on), one real
`flwr run` of the default scenario (SmolLM2-135M 4-bit, the FAQ's natural split over 4
clients, FLoRA) with `train.selection=shed` and one with `train.selection=random`; at a
budget of 1 both keep every example, so that is one run (`train.selection=all`). Every run
has the same rounds, local steps, seeds and server evaluation.

Printed and written to `<out>/shed.md`: per budget and method the held-out loss after the
last round for each seed and their mean; the examples the clients kept; the selection's own
cost (`selection-seconds`: per client, mean and largest, and as a share of the client's
local training seconds over the run); then measured ratios: per budget SHED's loss
reduction from the base model over random's, and each one's over the full data's.
`final_loss.png`: the final held-out loss against the budget. The runs share the machine
with whatever else runs on it: seconds are noisy.

    .venv/bin/python scripts/bench_shed.py                # 2 seeds x 5 runs, ~25 min on 2 cores
    .venv/bin/python scripts/bench_shed.py --quick        # 1 seed, budgets 1 and 0.25, 1 round
    .venv/bin/python scripts/bench_shed.py --report runs/bench-shed/<stamp>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_fedspine import federated

METHODS = ("shed", "random")
FULL = "all"  # a budget of 1: every example, whichever method


def run_name(method: str, budget: float, seed: int) -> str:
    return f"{FULL if budget >= 1 else method}-b{budget:g}-seed{seed}"


def forget_selections() -> None:
    """Remove the kept indices earlier runs saved (`fedapp.client.selection`: a cache), so
    that every run measures choosing, not reading a choice made before."""
    from fedapp.llm.model import cache_dir

    for path in (cache_dir() / "partitions").glob("*-selection-*.json"):
        path.unlink()


def run_all(args: argparse.Namespace, out: Path) -> None:
    common = (f"num_rounds={args.rounds} train.local_steps={args.local_steps} "
              f"train.selection_clusters={args.clusters} {args.eval}")
    for seed in args.seeds:
        for budget in args.budgets:
            for method in (FULL,) if budget >= 1 else METHODS:
                name = run_name(method, budget, seed)
                print(f"[bench] {name} ...", flush=True)
                forget_selections()
                federated(name, f"train.selection={method} train.selection_budget={budget} "
                          f"seed={seed} {common}", out / name)


def load(out: Path) -> dict[tuple[str, float], dict[int, list[dict]]]:
    """{(method, budget): {seed: metrics rows}} of the runs under `out`."""
    from fedapp.server.report import read_metrics

    runs: dict[tuple[str, float], dict[int, list[dict]]] = {}
    for run_dir in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()):
        method, budget, seed = run_dir.name.split("-")
        runs.setdefault((method, float(budget[1:])), {})[int(seed[4:])] = read_metrics(
            run_dir / "metrics.jsonl")
    return runs


def per_client(rows: list[dict], key: str) -> dict[str, float]:
    """{client: `key` summed over the run's rounds} (0 where a client did not report it)."""
    total: dict[str, float] = {}
    for row in rows[1:]:
        for name, c in row["clients"].items():
            total[name] = total.get(name, 0.0) + c.get(key, 0.0)
    return total


def figures(rows: list[dict]) -> dict[str, float]:
    """One run's final and base held-out loss, kept examples and selection cost."""
    selection, train = per_client(rows, "selection-seconds"), per_client(rows, "train-seconds")
    return {"final": rows[-1]["eval-loss"], "base": rows[0]["eval-loss"],
            "kept": sum(c["num-examples"] for c in rows[1]["clients"].values()),
            "selection mean": statistics.mean(selection.values()),
            "selection max": max(selection.values()),
            "selection / train": sum(selection.values()) / sum(train.values())}


def fmt_seeds(values: dict[int, float], digits: int = 4) -> str:
    return " / ".join(f"{values[s]:.{digits}f}" for s in sorted(values))


def table(runs: dict[tuple[str, float], dict[int, list[dict]]]) -> tuple[list[str], dict]:
    """The markdown table and {(method, budget): {figure: {seed: value}}}."""
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    got: dict[tuple[str, float], dict[str, dict[int, float]]] = {}
    for key, by_seed in runs.items():
        for seed, rows in by_seed.items():
            for name, value in figures(rows).items():
                got.setdefault(key, {}).setdefault(name, {})[seed] = value
    per_seed = f"(seed {' / '.join(map(str, seeds))})"
    lines = [(f"| budget | method | held-out loss {per_seed} | mean | examples kept | "
              f"selection s per client, mean {per_seed} | largest | selection / train s "
              f"{per_seed} |"), "|---|---|---|---|---|---|---|---|"]
    for method, budget in sorted(got, key=lambda k: (-k[1], k[0] != FULL, k[0])):
        f = got[(method, budget)]
        lines.append(
            f"| {budget:.0%} | {method} | {fmt_seeds(f['final'])} | "
            f"{statistics.mean(f['final'].values()):.4f} | {fmt_seeds(f['kept'], 0)} | "
            f"{fmt_seeds(f['selection mean'], 1)} | {max(f['selection max'].values()):.1f} | "
            f"{fmt_seeds(f['selection / train'], 2)} |")
    return lines, got


def ratios(got: dict) -> list[str]:
    """Loss reductions from the base model, SHED's over random's and over the full data's."""
    def reduction(key: tuple[str, float]) -> float:
        f = got[key]
        return statistics.mean(f["base"][s] - f["final"][s] for s in f["final"])

    full = next((k for k in got if k[0] == FULL), None)
    lines = []
    for budget in sorted({b for m, b in got if m != FULL}, reverse=True):
        shed, rand = reduction(("shed", budget)), reduction(("random", budget))
        line = (f"- budget {budget:.0%}: loss reduction from the base, SHED {shed:.4f} / random "
                f"{rand:.4f} = {shed / rand:.3f}x")
        if full is not None:
            whole = reduction(full)
            line += (f"; of the full data's {whole:.4f}: SHED {shed / whole:.3f}x, random "
                     f"{rand / whole:.3f}x")
        lines.append(line)
    return lines


def report(out: Path) -> str:
    runs = load(out)
    lines, got = table(runs)
    base = {s: v for f in got.values() for s, v in f["base"].items()}
    text = "\n".join([
        f"# SHED vs random selection at equal budgets ({out.name})", "",
        (f"Base model held-out loss per seed: {fmt_seeds(base)}. Selection seconds are "
        "each client's `selection-seconds` summed over the run; the last column divides "
        "all clients' selection seconds by their local training seconds. Seconds depend on "
        "what else ran on the machine meanwhile."), "", *lines, "",
        "Measured ratios (means over seeds):", "", *ratios(got)]) + "\n"
    (out / "shed.md").write_text(text)
    plot(got, out / "final_loss.png")
    return text


def plot(got: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = [f for (m, _), f in got.items() if m == FULL]
    for method in METHODS:
        points = sorted((b, f["final"]) for (m, b), f in got.items() if m == method)
        points += [(1.0, f["final"]) for f in full]
        xs = [b for b, _ in points]
        line = ax.plot(xs, [statistics.mean(v.values()) for _, v in points], marker="o",
                       label=f"{method} (mean over seeds)")[0]
        for b, values in points:
            ax.scatter([b] * len(values), list(values.values()), color=line.get_color(),
                       alpha=0.35, s=12)
    ax.set(xlabel="budget (share of each client's examples)", ylabel="final held-out loss",
           title="SHED vs random selection")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--eval", default="eval.max_examples=32 eval.ranking_examples=0 "
                                          "eval.generate_examples=0")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: seed 0, budgets 1 and 0.25, 1 round of 2 steps")
    parser.add_argument("--report", type=Path, default=None, help="only report this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-shed")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.budgets, args.rounds, args.local_steps = [0], [1.0, 0.25], 1, 2
        args.eval = "eval.max_examples=16 eval.ranking_examples=0 eval.generate_examples=0"
    out = args.report or args.out / time.strftime("%Y%m%d-%H%M%S")
    if args.report is None:
        out.mkdir(parents=True)
        start = time.perf_counter()
        run_all(args, out)
        print(f"[bench] all runs: {time.perf_counter() - start:.0f} s wall", flush=True)
    print(report(out))


if __name__ == "__main__":
    main()
