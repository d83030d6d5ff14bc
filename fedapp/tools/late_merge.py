"""Fold a late client into a finished run's global adapter (one-shot aggregation is a sum).

    # a late client's own adapter folder (peft format) and its number of examples:
    python -m fedapp.tools.late_merge runs/<run> --late-adapter /path/adapter --num-examples 120 \
        --out runs/<run>/adapter-merged
    # or train the late client here, with the run's own orders, then fold it in:
    python -m fedapp.tools.late_merge runs/<run> --train-partition 3 --num-partitions 4 \
        --out runs/<run>/adapter-merged

The result equals aggregating every client at once; `<out>/aggregate.json` records the new
total weight so that further late clients can be folded in the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from strategies.late_math import fold_in, fold_in_average
from strategies.lora_math import (
    LoraUpdate,
    join_factors,
    rank_of,
    split_factors,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter_config) of a peft LoRA folder."""
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder} is not a peft adapter folder: no {name}")
    return load_file(str(folder / ADAPTER_WEIGHTS)), json.loads((folder / ADAPTER_CONFIG).read_text())


def merge_late(adapter_dir: Path, aggregate: dict, late: LoraUpdate, out_dir: Path) -> dict:
    """Write `adapter_dir` + `late` to `out_dir` (a peft folder); return the new aggregate."""
    state, config = read_adapter(adapter_dir)
    combine = aggregate.get("combine")
    if combine not in ("stack", "average"):
        raise ValueError(f"aggregate.json has combine={combine!r}: late merging needs a "
                         "one-shot run (combine 'stack' or 'average')")
    factors = split_factors(state)
    if set(factors) != set(late.factors):
        raise ValueError(
            f"the late adapter's modules differ from the run's: missing "
            f"{sorted(set(factors) - set(late.factors))[:3]}, extra "
            f"{sorted(set(late.factors) - set(factors))[:3]}; it must target the same modules")
    if combine == "stack":
        merged = fold_in(factors, aggregate["total-weight"], late)
        rank = rank_of(merged)
        config.update(r=rank, lora_alpha=rank)  # scaling stays 1
    else:
        if abs(late.scaling - aggregate["scaling"]) > 1e-9 or late.rank != config["r"]:
            raise ValueError(f"combine='average' needs the late adapter's rank and scaling to "
                             f"match: got r={late.rank}, scaling={late.scaling}; run has "
                             f"r={config['r']}, scaling={aggregate['scaling']}")
        merged = fold_in_average(factors, aggregate["total-weight"], late)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in join_factors(merged).items()},
              str(out_dir / ADAPTER_WEIGHTS))
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    new_aggregate = {**aggregate, "total-weight": aggregate["total-weight"] + late.weight}
    (out_dir / "aggregate.json").write_text(json.dumps(new_aggregate, indent=2))
    return new_aggregate


def train_late_client(run_dir: Path, partition_id: int, num_partitions: int) -> LoraUpdate:
    """Run the late client's one-shot training here, with the orders the run gave."""

    from fedapp.client.round import run_round
    from fedapp.config import build_strategy, load_run_config
    from fedapp.llm.adapters import target_module_shapes
    from fedapp.llm.model import cached_base, default_device
    from strategies.base import ClientIdentity

    cfg = load_run_config(run_dir)  # the run's composed config
    base = cached_base(cfg.model.path, cfg.model.quantization, default_device())
    strategy = build_strategy(cfg, target_module_shapes(base, list(cfg.lora.target_modules)))
    order = strategy.order_for(1, ClientIdentity(f"partition-{partition_id}", partition_id))
    result = run_round(strategy.setup, order, partition_id, num_partitions, {})
    return LoraUpdate(split_factors(result.state), order.scaling,
                      result.metrics["num-examples"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--late-adapter", type=Path, help="the late client's peft folder")
    parser.add_argument("--num-examples", type=float, help="the late client's num-examples")
    parser.add_argument("--train-partition", type=int, help="train this partition here")
    parser.add_argument("--num-partitions", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    source = args.run_dir / "adapter"
    aggregate_path = args.run_dir / "aggregate.json"
    if (args.run_dir / ADAPTER_WEIGHTS).exists():  # an earlier merge's output
        source, aggregate_path = args.run_dir, args.run_dir / "aggregate.json"
    aggregate = json.loads(aggregate_path.read_text())
    if args.late_adapter:
        if args.num_examples is None or args.num_examples <= 0:
            parser.error("--late-adapter needs --num-examples > 0")
        state, config = read_adapter(args.late_adapter)
        if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
            parser.error("the late adapter uses rsLoRA or per-module ranks/alphas, which late "
                         "merging does not support; allowed: one r and lora_alpha")
        late = LoraUpdate(split_factors(state), config["lora_alpha"] / config["r"],
                          args.num_examples)
    elif args.train_partition is not None and args.num_partitions:
        late = train_late_client(args.run_dir, args.train_partition, args.num_partitions)
    else:
        parser.error("give --late-adapter DIR --num-examples N, or --train-partition I "
                     "--num-partitions N")
    result = merge_late(source, aggregate, late, args.out)
    if source != args.out and (source / "README.md").exists():
        shutil.copy(source / "README.md", args.out / "README.md")
    print(f"merged a late client (weight {late.weight:g}, r={late.rank}) into {args.out}; "
          f"total weight now {result['total-weight']:g}")


if __name__ == "__main__":
    main()
