"""Which pruning criterion leaves the best model after recovery, measured in one run.

For each device partition, ratio and criterion (`strategy.prune.criterion`), SmolLM2-135M
4-bit with a fresh LoRA is scored on `--calibration` batches of the partition (as a
FedSpine round's first slice is), pruned to the ratio in one step (`iterative_prune`, the
app's planning: KV groups and MLP channel groups per layer; a criterion suffixed `+global`
ranks them across layers, `fedapp.pruning.allocation`), then its LoRA is trained on
the partition for `--steps` steps, `--every` at a time, each with a fresh AdamW as a
client's round has (so `--every` is the round's local steps); its held-out loss is printed
right after pruning and after each of those. The unpruned model trained the same steps on the same batches is
the reference. Printed per ratio: each criterion's mean over partitions and its gap to the
unpruned reference (what recovery has still to close), and the ratio of each criterion's
gap to the first-order Taylor criterion's.

    .venv/bin/python scripts/bench_criteria.py                  # 0.25, 0.5 x 2 partitions
    .venv/bin/python scripts/bench_criteria.py --ratios 0.5 --partitions 0 --steps 24
    .venv/bin/python scripts/bench_criteria.py --overrides "lora.target_modules=[...]"
    .venv/bin/python scripts/bench_criteria.py --criteria fisher,fisher+ls --ratios 0.5
    .venv/bin/python scripts/bench_criteria.py --criteria fisher,fisher+global --ratios 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = "unpruned"
REFITTED = "+ls"  # criterion name suffix: with least-squares refit (iterative_prune(refit=True))
GLOBAL = "+global"  # criterion name suffix: units ranked across layers (allocation="global")


def measure(setup, partition: int, partitions: int, criterion: str, ratio: float,
            steps: int, every: int, calibration: int, held: list[dict]) -> dict[str, float]:
    """Held-out losses of one (partition, criterion, ratio): after pruning and every `every`
    recovery steps (keys "pruned", "step 12", ...); the criterion REFERENCE does not prune."""
    from fedapp.client.selection import selected_examples
    from fedapp.llm.adapters import with_lora
    from fedapp.llm.data import first_batches, train_batches
    from fedapp.llm.model import load_base
    from fedapp.llm.train import eval_loss, train_steps
    from fedapp.pruning.surgery import iterative_prune

    examples, pad = selected_examples(setup, partitions, partition)
    batches = train_batches(examples, setup.batch_size, pad, seed=1000 * partition)
    calib = first_batches(examples, setup.batch_size, pad, calibration)
    base = load_base(setup.model_path, setup.quantization, "cpu")
    losses = {}
    name, refit, allocation = parse_criterion(criterion)
    with with_lora(base, 8, 16, list(setup.target_modules), seed=0) as model:
        if criterion != REFERENCE:
            iterative_prune(model, ratio, 1, lambda _m: None, name, refit=refit,
                            allocation=allocation,
                            batches=calib if name != "magnitude" or refit else None)
        losses["pruned"] = eval_loss(model, held, setup.batch_size, pad)
        for done in range(every, steps + 1, every):
            train_steps(model, batches, every, setup.lr, log_every=0)
            losses[f"step {done}"] = eval_loss(model, held, setup.batch_size, pad)
    return losses


def parse_criterion(criterion: str) -> tuple[str, bool, str]:
    """"fisher+global+ls" -> ("fisher", True, "global"): the criterion, whether refitted,
    the allocation."""
    allocation = "global" if GLOBAL in criterion else "uniform"
    name = criterion.replace(GLOBAL, "")
    return name.removesuffix(REFITTED), name.endswith(REFITTED), allocation


def bad_criterion(criterion: str) -> str | None:
    """Why `criterion` is not one this bench runs, or None."""
    from strategies.protocol import CRITERIA, GLOBAL_CRITERIA

    name, _, allocation = parse_criterion(criterion)
    if name in CRITERIA and name != "llm-drop" and (
            allocation == "uniform" or name in GLOBAL_CRITERIA):
        return None
    return (f"criterion {criterion!r}; allowed: {[c for c in CRITERIA if c != 'llm-drop']}, "
            f"each optionally with {GLOBAL!r} (units ranked across layers: "
            f"{list(GLOBAL_CRITERIA)} only, whose scores compare across layers) and "
            f"{REFITTED!r} (least-squares refit of the pruned blocks' outputs)")


def table(results: dict[tuple, dict[str, float]], ratio: float, criteria: list[str],
          partitions: list[int]) -> list[str]:
    """Markdown rows for one ratio: mean held-out loss over partitions per column, the
    gap to the unpruned reference at the last step, and that gap's ratio to taylor's."""
    columns = list(next(iter(results.values())))
    last = columns[-1]

    def mean(criterion: str, column: str, r: float) -> float:
        return statistics.mean(results[p, criterion, r][column] for p in partitions)

    reference = mean(REFERENCE, last, 0.0)
    rows = [f"### ratio {ratio} (held-out loss, mean over partitions {partitions})", "",
            "| criterion | " + " | ".join(columns) + f" | gap to unpruned at {last} | "
            "gap / taylor's |", "|---" * (len(columns) + 3) + "|"]
    taylor_gap = mean("taylor", last, ratio) - reference if "taylor" in criteria else None
    for criterion in criteria:
        gap = mean(criterion, last, ratio) - reference
        share = f"{gap / taylor_gap:.2f}x" if taylor_gap else "n/a"
        rows.append(f"| {criterion} | " + " | ".join(
            f"{mean(criterion, c, ratio):.3f}" for c in columns) + f" | {gap:.3f} | {share} |")
    rows.append(f"| {REFERENCE} | " + " | ".join(
        f"{mean(REFERENCE, c, 0.0):.3f}" for c in columns) + " | 0 | |")
    per = ", ".join(f"{c} " + " / ".join(f"{results[p, c, ratio][last]:.3f}"
                                         for p in partitions) for c in criteria)
    return rows + ["", f"Per partition at {last}: {per}; {REFERENCE} " + " / ".join(
        f"{results[p, REFERENCE, 0.0][last]:.3f}" for p in partitions), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--criteria", default="magnitude,taylor,fisher")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--partitions", default="0,1", help="which of --num-partitions")
    parser.add_argument("--num-partitions", type=int, default=4)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--every", type=int, default=12)
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--eval-examples", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--overrides", default="", help="Hydra overrides of the run's config, "
                        "e.g. 'lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,"
                        "up_proj,down_proj]'")
    args = parser.parse_args()
    criteria = args.criteria.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    partitions = [int(p) for p in args.partitions.split(",")]
    if args.steps < args.every or args.every < 1:
        parser.error(f"--steps={args.steps}, --every={args.every}; allowed: 1 <= every <= steps")
    if bad := [r for r in ratios if not 0 < r < 1]:
        parser.error(f"--ratios {bad}; allowed: 0 < ratio < 1")
    if bad := [p for p in partitions if not 0 <= p < args.num_partitions]:
        parser.error(f"--partitions {bad}; allowed: 0 .. {args.num_partitions - 1}")
    for criterion in criteria:
        if (why := bad_criterion(criterion)) is not None:
            parser.error(why)

    import torch

    from fedapp.config import compose_config, run_setup
    from fedapp.llm.model import load_tokenizer
    from fedapp.server.evaluate import heldout_examples

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = run_setup(compose_config(args.overrides))
    held = heldout_examples(setup.data, load_tokenizer(setup.model_path), setup.max_length,
                            args.eval_examples)
    runs = [(p, REFERENCE, 0.0) for p in partitions] + [
        (p, c, r) for r in ratios for c in criteria for p in partitions]
    results, start = {}, time.perf_counter()
    for n, (partition, criterion, ratio) in enumerate(runs, 1):
        results[partition, criterion, ratio] = losses = measure(
            setup, partition, args.num_partitions, criterion, ratio, args.steps, args.every,
            args.calibration, held)
        print(f"[{n}/{len(runs)} {time.perf_counter() - start:.0f} s] partition {partition} "
              f"{criterion} {ratio}: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()),
              flush=True)
    print(f"\n{setup.model_path}, {setup.quantization}, LoRA r8 on "
          f"{list(setup.target_modules)}, lr {setup.lr}, batch {setup.batch_size}, "
          f"{args.calibration} calibration batches, {len(held)} held-out examples\n")
    for ratio in ratios:
        print("\n".join(table(results, ratio, criteria, partitions)))


if __name__ == "__main__":
    main()
