"""FedSpine against its baselines at the same per-device sparsity, all measured in this run.

Every method runs as a real `flwr run` simulation of SmolLM2-135M 4-bit under the
`phones_laptops_edge` scenario with the same device profiles, memory budgets, data, local
steps, rounds and seeds, and the same final sparsity per device class (`--sparsity`, set as
`scenario.devices.<class>.sparsity`, reached by construction in the last round):

    fedspine             the bandit picks each device's path (how early it prunes, its rank)
    fedspine-repair      the same, its reward measured from the model after each round's
                         pruning (`strategy.reward_from=pruned`): arms paid for repair
    random-arms          a random feasible arm of the grid each round
    fixed-arms           no choice: rank 8, pruned as far as memory needs, the rest at the end
    prune-once           pruned to the target in round 1 (same criterion), then FLoRA on the
                         fixed submodels at rank 8
    federate-then-prune  FLoRA on the unpruned model among the devices that can hold it
                         (phones sit out), all pruned to the target in the last round, with
                         that round's steps to recover (rank 8)

What counts is each device's **deployed** model (its pruned 4-bit base + the adapter it
holds, `fedapp.server.deployed`), evaluated on the held-out set every `--deployed-every`
rounds. Printed per method (mean over seeds, and the spread): simulated seconds until the
mean deployed loss first reaches a target (the worst final mean among the methods: a level
every method reaches; and 95 % of the way from the worst to the best any reaches; each
seed's targets from that seed's runs, as seeds differ more than methods do), counted
only in rounds where every device's deployed model stood at its target sparsity, the
final deployed loss (mean and worst device) and answer-ranking accuracy, the sparsity each
device reached, the memory estimate of the arms played per device class against its budget,
MB on the wire, each method's ratio to FedSpine, and how many times sooner FedSpine
reaches each baseline's final mean deployed loss than the baseline does. Pruning is
charged in the round it happens (it is inside the client's timed training). Deployed
models at equal sparsity have equal shapes, so their inference cost is measured once, by
`scripts/bench_deployed.py` on a run directory this bench leaves.

Writes `<out>/fedspine.md`, `deployed_loss.png` (mean deployed loss vs simulated seconds,
per method and seed) and `arms.png` (FedSpine's arms and rewards per device and round).

    .venv/bin/python scripts/bench_fedspine.py                       # 15 rounds x 2 seeds
    .venv/bin/python scripts/bench_fedspine.py --rounds 6 --seeds 0 --local-steps 4
    .venv/bin/python scripts/bench_fedspine.py --report runs/bench-fedspine/<stamp>
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from fedapp.server.report import read_metrics
from fedapp.tools.submit import flower_env, run_submit
from strategies.spine_memory import estimated_memory_mb

METHODS = {
    "fedspine": "strategy=fedspine",
    "fedspine-repair": "strategy=fedspine strategy.reward_from=pruned",
    "random-arms": "strategy=fedspine strategy.arm_policy=random",
    "fixed-arms": "strategy=fedspine strategy.bandit.prune_ratios=[0.0] "
                  "strategy.bandit.ranks=[8] strategy.bandit.max_arms=1",
    "prune-once": "strategy=fedspine strategy.bandit.prune_ratios=[0.75] "
                  "strategy.bandit.ranks=[8] strategy.bandit.max_arms=1",
    "federate-then-prune": "strategy=fedspine strategy.prune_at_end=true "
                           "strategy.bandit.ranks=[8] strategy.bandit.max_arms=3",
}
# max_arms = the grid's size: the fixed baselines' bandits must not refine around rank 8
# (before it, prune-once's grid grew to ranks 4-12 and it trained at rank 6 from round 4)
LOSS = "deployed-eval-loss-mean"
SPINES = ("fedspine", "fedspine-repair")  # the FedSpine variants; the first present is the reference


def federated(name: str, overrides: str, run_dir: Path) -> None:
    """One `flwr run` with its own SuperLink (stopped after)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = flower_env(f"{tmp}/flwr-home", isolated_ports=True)
        start = time.perf_counter()
        out = run_submit(ROOT, 4, overrides, run_dir, env)
        if out.returncode != 0:
            sys.exit(f"{name}: flwr run failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    print(f"[bench] {run_dir.name}: {time.perf_counter() - start:.0f} s wall", flush=True)


def at_target(run: dict) -> list[dict]:
    """The rows whose deployed models all stood at their target sparsity: before that a
    device deploys a less pruned model (federate-then-prune's are unpruned until the last
    round), which is not the model the comparison is about."""
    targets = {n: d["target"] for n, d in run["devices"].items()}
    reached: dict[str, float] = {}
    out = []
    for row in run["rows"]:
        for name, c in row.get("clients", {}).items():
            if c.get("status") == "ok":
                reached[name] = max(reached.get(name, 0.0), c.get("train-ratio", 0.0))
        if LOSS in row and all(reached.get(n, 0.0) >= t - 1e-6 for n, t in targets.items()):
            out.append(row)
    return out


def seed_targets(runs: list[dict]) -> dict[str, float]:
    """One seed's targets from its runs (one per method): the worst final mean deployed
    loss, and 95 % of the way from the worst mean any method had at its target sparsity to
    the best (pruned models start above the unpruned base's loss)."""
    finals = [statistics.mean(d["eval-loss"] for d in run["devices"].values()) for run in runs]
    losses = [r[LOSS] for run in runs for r in at_target(run)]
    worst, best = max(losses), min(losses)
    return {"worst final": max(finals), "95% of best": worst - 0.95 * (worst - best)}


def measured_sparsity(run: dict, name: str) -> float:
    """The sparsity `name`'s model had after its last successful round (client-measured)."""
    return next((row["clients"][name]["sparsity"] for row in reversed(run["rows"])
                 if row.get("clients", {}).get(name, {}).get("status") == "ok"), math.nan)


def time_to(rows: list[dict], target: float) -> float:
    """Simulated seconds at the first of `rows` whose mean deployed loss is <= target."""
    return next((r["sim-seconds"] for r in rows if r[LOSS] <= target + 1e-6), math.inf)


def sooner_to_final(ref: dict, run: dict) -> float:
    """How many times sooner `ref` reaches `run`'s final mean deployed loss (its last row at
    target sparsity) than `run` itself first does, in simulated seconds: > 1 means `ref` is
    faster to the quality `run` ends with; 0 when `ref` never reaches it."""
    rows = at_target(run)
    final = rows[-1][LOSS]
    own, mine = time_to(rows, final), time_to(at_target(ref), final)
    return own / mine if math.isfinite(mine) else 0.0


def spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return "never" if not finite else f"{statistics.mean(finite):.1f} ({len(finite)} of " \
                                          f"{len(values)} seeds)"
    half = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {half:.2g}" if len(values) > 1 else f"{values[0]:.4g}"


def load(out_dir: Path) -> dict[str, dict[int, dict]]:
    """{method: {seed: {"rows": metrics rows, "devices": summary.json, "dir": run dir}}}."""
    runs: dict[str, dict[int, dict]] = {}
    for run_dir in sorted(p for p in out_dir.iterdir() if (p / "metrics.jsonl").exists()):
        method, seed = run_dir.name.rsplit("-seed", 1)
        devices = json.loads((run_dir / "devices" / "summary.json").read_text())
        runs.setdefault(method, {})[int(seed)] = {
            "rows": read_metrics(run_dir / "metrics.jsonl"), "devices": devices, "dir": run_dir}
    return runs


def method_figures(runs: dict[int, dict], targets: dict[int, dict[str, float]]
                   ) -> dict[str, list[float]]:
    """One method's figures per seed, its times to that seed's targets."""
    figures: dict[str, list[float]] = {k: [] for k in (
        "to worst final", "to 95% of best", "final mean loss", "final worst loss",
        "final rank acc", "MB on the wire", "sim s total")}
    for seed, run in runs.items():
        rows, devices = run["rows"], run["devices"]
        losses = [d["eval-loss"] for d in devices.values()]
        for key in ("worst final", "95% of best"):
            figures[f"to {key}"].append(time_to(at_target(run), targets[seed][key]))
        figures["final mean loss"].append(statistics.mean(losses))
        figures["final worst loss"].append(max(losses))
        figures["final rank acc"].append(statistics.mean(
            d.get("eval-rank-accuracy", math.nan) for d in devices.values()))
        figures["MB on the wire"].append(rows[-1]["cum-mb"])
        figures["sim s total"].append(rows[-1]["sim-seconds"])
    return figures


def memory_by_class(run: dict) -> dict[str, tuple[float, float, float, float]]:
    """{device class: (largest estimated MB while loading and pruning, i.e. at the structure
    a round starts from, largest while training after pruning, its budget, largest process
    peak RSS MiB)}, estimates by the run's strategy.memory at the arm's rank."""
    cfg = OmegaConf.load(run["dir"] / "config.yaml")
    mem, devices = cfg.strategy.memory, cfg.scenario.devices
    start: dict[str, float] = {}  # per client: the ratio its structure had before the round
    out: dict[str, tuple[float, float, float, float]] = {}

    def estimate(ratio: float, rank: float) -> float:  # FedSpine's own memory model
        return estimated_memory_mb(ratio, int(rank), mem.base_mb, mem.lora_mb_per_rank,
                                   mem.fixed_mb)
    for row in run["rows"][1:]:
        for name, c in row.get("clients", {}).items():
            if c.get("status") != "ok":
                continue
            ratio = c.get("train-ratio", 0.0)
            load, train = estimate(start.get(name, 0.0), c["arm-rank"]), estimate(
                ratio, c["arm-rank"])
            start[name] = ratio
            old = out.get(c["device"], (0.0, 0.0, float(devices[c["device"]].memory_mb), 0.0))
            out[c["device"]] = (max(old[0], load), max(old[1], train), old[2],
                                max(old[3], c.get("peak-rss-mb", 0)))
    return dict(sorted(out.items()))


def report(out_dir: Path) -> str:
    runs = load(out_dir)
    ref = next((m for m in SPINES if m in runs), None)
    if ref is None:  # the ratios are to a FedSpine run
        sys.exit(f"{out_dir} holds no fedspine or fedspine-repair run; allowed: a folder this "
                 "bench wrote with one of them")
    start = next(iter(next(iter(runs.values())).values()))["rows"][0]["eval-loss"]
    seeds = sorted({s for m in runs.values() for s in m})
    targets = {seed: seed_targets([m[seed] for m in runs.values() if seed in m])
               for seed in seeds}
    figures = {m: method_figures(r, targets) for m, r in runs.items()}
    lines = [f"# FedSpine vs baselines at equal per-device sparsity ({out_dir.name})", "",
             (f"Seeds {seeds}; held-out loss of the unpruned base {start:.4f}. Targets on "
              "the mean deployed loss, each seed's from the runs of that seed: the worst "
              "final mean of the methods, and 95 % of the way from the worst mean deployed loss "
              "any method had at its target sparsity to the best; both counted only in rounds "
              "where every device's deployed model stood at its target sparsity. "
              + "; ".join(f"seed {seed}: worst final {t['worst final']:.4f}, 95 % of best "
                          f"{t['95% of best']:.4f}" for seed, t in targets.items())
              + ". Mean ± half the range over seeds."),
             "", "| method | " + " | ".join(next(iter(figures.values()))) + " |",
             "|---" * (1 + len(next(iter(figures.values())))) + "|"]
    for method, figs in figures.items():
        lines.append(f"| {method} | " + " | ".join(spread(v) for v in figs.values()) + " |")
    lines += ["", (f"Ratios to {ref} (a method's mean / {ref}'s mean over the seeds both ran; "
              f"for seconds to a target > 1 means {ref} got there sooner):"), ""]

    def mean(values: list[float]) -> float:
        return statistics.mean(values) if all(map(math.isfinite, values)) else math.inf
    for method in figures:
        if method == ref:
            continue
        common = sorted(runs[method].keys() & runs[ref].keys())
        if not common:
            lines.append(f"- {method}: no seed in common with {ref}")
            continue
        figs = method_figures({s: runs[method][s] for s in common}, targets)
        base = {k: mean(v) for k, v in method_figures(
            {s: runs[ref][s] for s in common}, targets).items()}
        ratios = [f"seeds {common}"]
        for key in ("to worst final", "to 95% of best", "final mean loss", "final worst loss"):
            mine = mean(figs[key])
            if math.isfinite(mine) and math.isfinite(base[key]):
                ratios.append(f"{key} {mine / base[key]:.2f}x")
            else:  # a ratio to (or of) a target never reached would read 0.00x or inf
                ratios.append(f"{key} n/a ({ref if math.isfinite(mine) else method} never "
                              "reached it)")
        sooner = [sooner_to_final(runs[ref][s], runs[method][s]) for s in common]
        each = [f"{x:.2f}x" if x else "never" for x in sooner]  # 0: ref never reached it
        ratios.append(f"{ref} to {method}'s final mean: " + (
            f"{statistics.mean(sooner):.2f}x sooner" if all(sooner) else "n/a")
            + (f" (per seed {', '.join(each)})" if len(common) > 1 or not all(sooner) else ""))
        lines.append(f"- {method}: " + ", ".join(ratios))
    lines += ["", "Per seed:", "", ("| seed | method | to worst final | to 95% of best | "
              "final mean loss | final worst loss | MB on the wire | sim s total |"),
              "|---" * 8 + "|"]
    for seed in seeds:
        for method, by_seed in runs.items():
            if seed in by_seed:
                f = method_figures({seed: by_seed[seed]}, targets)
                lines.append(f"| {seed} | {method} | " + " | ".join(spread(f[k]) for k in (
                    "to worst final", "to 95% of best", "final mean loss", "final worst loss",
                    "MB on the wire", "sim s total")) + " |")
    lines += ["", ("Training memory per device class (each method's first seed): the "
              "largest estimate (strategy.memory at the arm's rank) while loading and pruning "
              "(the structure a round starts from: unpruned in a device's first round) and "
              "while training (after pruning), against the class's budget, and the largest "
              "peak RSS a client process reported (in simulation a process also holds other "
              "clients' cached copies, so it is an upper bound):"), ""]
    for method, by_seed in runs.items():
        lines.append(f"- {method}: " + "; ".join(
            f"{c} load/prune {load:.0f}, train {train:.0f} / budget {budget:g} MB, process "
            f"peak {rss:.0f} MiB"
            for c, (load, train, budget, rss) in memory_by_class(by_seed[min(by_seed)]).items()))
    lines += ["", ("Per device (each method's first seed): class, target and reached sparsity "
              "(the orders' ratio), the sparsity measured on the model (pruned prunable "
              "parameters, whole KV groups and MLP channel groups), deployed loss, parameters "
              "kept:"), ""]
    for method, by_seed in runs.items():
        run = by_seed[min(by_seed)]
        lines.append(f"- {method}: " + "; ".join(
            f"{n} {d['device']} {d['target']:.2f}/{d['reached']:.2f} measured "
            f"{measured_sparsity(run, n):.3f} loss {d['eval-loss']:.3f} "
            f"params {d['params-ratio']:.3f}" for n, d in run["devices"].items()))
    plot(runs, out_dir)
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[int, dict]], out_dir: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (method, by_seed) in enumerate(runs.items()):
        for j, run in enumerate(by_seed.values()):
            rows = [r for r in run["rows"] if LOSS in r]
            ax.plot([r["sim-seconds"] for r in rows], [r[LOSS] for r in rows],
                    color=f"C{i}", alpha=1.0 if j == 0 else 0.4, marker="o", ms=3,
                    label=method if j == 0 else None)
    ax.set(xlabel="simulated seconds", ylabel="mean held-out loss of the deployed models",
           title="Deployed quality vs simulated time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "deployed_loss.png", dpi=100)
    plt.close(fig)
    for method in SPINES:  # each bandit's choices, first seed
        if method in runs:
            plot_arms(next(iter(runs[method].values()))["rows"][1:],
                      out_dir / ("arms.png" if method == "fedspine" else f"arms-{method}.png"))


def plot_arms(spine: list[dict], path: Path) -> None:
    """Per client and round: the bandit's reward, the ratio trained at, the rank."""
    names = sorted({n for r in spine for n in r.get("clients", {})})
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        got = [(r["round"], r["clients"][name]) for r in spine if name in r.get("clients", {})]
        ax.plot([t for t, _ in got], [c.get("reward", math.nan) for _, c in got], "o-",
                label="reward")
        ax.plot([t for t, _ in got], [c.get("train-ratio", 0) for _, c in got], "s--",
                label="prune ratio")
        for t, c in got:
            ax.annotate(f"r{int(c.get('arm-rank', 0))}", (t, c.get("train-ratio", 0)),
                        fontsize=7)
        ax.set(title=f"{name} ({got[0][1].get('device', '?') if got else '?'})",
               xlabel="round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seeds", default="0,1", help="comma-separated")
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--sparsity", default="phone=0.5,laptop=0.25,edge=0.0",
                        help="target sparsity per device class")
    parser.add_argument("--deployed-every", type=int, default=1)
    parser.add_argument("--eval", default="eval.max_examples=50 eval.ranking_examples=24 "
                        "eval.generate_examples=0", help="evaluation overrides")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--overrides", default="", help="Hydra overrides for every method, "
                        "e.g. 'lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                        "down_proj]'")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-fedspine"))
    parser.add_argument("--report", help="rewrite (and print) the report and plots of an "
                        "earlier bench folder")
    args = parser.parse_args()
    if args.report:
        text = report(Path(args.report))
        (Path(args.report) / "fedspine.md").write_text(text)
        print(text)
        return
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        sys.exit(f"--methods names {unknown}; allowed: {list(METHODS)}")
    sparsity = " ".join(f"scenario.devices.{c}.sparsity={v}" for c, v in
                        (kv.split("=") for kv in args.sparsity.split(",")))
    out_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    common = (f"scenario=phones_laptops_edge num_rounds={args.rounds} "
              f"train.local_steps={args.local_steps} eval.deployed_every={args.deployed_every} "
              f"{args.eval} {sparsity} {args.overrides}")
    for seed in args.seeds.split(","):
        for method in args.methods.split(","):
            print(f"[bench] {method}, seed {seed}: {args.rounds} rounds x {args.local_steps} "
                  "steps", flush=True)
            federated(method, f"{common} seed={seed} {METHODS[method]}",
                      out_dir / f"{method}-seed{seed}")
    text = report(out_dir)
    (out_dir / "fedspine.md").write_text(text)
    print(text)
    print(f"[bench] {out_dir}/fedspine.md, deployed_loss.png, arms*.png; inference cost: "
          f"scripts/bench_deployed.py {out_dir}/<method>-seed{args.seeds.split(',')[0]}")


if __name__ == "__main__":
    main()
