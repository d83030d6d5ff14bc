"""Folding a late client into a finished one-shot run (fedapp/late_merge.py), on real peft
adapter folders written with safetensors; the expectation is aggregating everyone at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedapp.tools.late_merge import merge_late, read_adapter
from strategies.lora_math import (
    LoraUpdate,
    exact_delta,
    fedavg_factors,
    join_factors,
    split_factors,
    stack_factors,
)

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model.model.layers.0.self_attn."
MODULE_SHAPES = {PREFIX + "q_proj": (8, 6), PREFIX + "v_proj": (4, 6)}  # (out, in)


def random_update(r: int, scaling: float, weight: float, seed: int) -> LoraUpdate:
    """A rank-r adapter over MODULE_SHAPES with random non-zero A (r, in) and B (out, r)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen))
               for m, (n_out, n_in) in MODULE_SHAPES.items()}
    return LoraUpdate(factors, scaling, weight)


def write_adapter(folder: Path, factors, r: int, lora_alpha: float) -> Path:
    """A peft LoRA folder: adapter_model.safetensors + adapter_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in join_factors(factors).items()},
              str(folder / "adapter_model.safetensors"))
    config = {"r": r, "lora_alpha": lora_alpha, "target_modules": ["q_proj", "v_proj"],
              "peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
              "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def stacked_run(folder: Path, updates: list[LoraUpdate]) -> tuple[Path, dict]:
    """A one-shot `combine: stack` run's exported adapter and its aggregate facts."""
    stacked = stack_factors(updates)
    rank = sum(u.rank for u in updates)
    adapter_dir = write_adapter(folder, stacked, rank, rank)
    return adapter_dir, {"combine": "stack", "total-weight": sum(u.weight for u in updates),
                         "scaling": 1.0}


def assert_products(state: dict[str, torch.Tensor], everyone: list[LoraUpdate]) -> None:
    for module, (a, b) in split_factors(state).items():
        torch.testing.assert_close(b @ a, exact_delta(everyone, module), rtol=1e-5, atol=1e-5)


EARLY = [(2, 2.0, 10.0, 1), (3, 1.0, 30.0, 2)]  # (r, scaling, weight, seed)


def test_merge_late_stack_equals_stacking_everyone_at_once(tmp_path):
    # Prepare: a run of clients of ranks 2 and 3 (weights 10, 30), a late rank-4 client
    early = [random_update(*spec) for spec in EARLY]
    adapter_dir, aggregate = stacked_run(tmp_path / "run" / "adapter", early)
    late = random_update(4, 2.0, 20.0, seed=3)
    out = tmp_path / "merged"

    # Execute
    result = merge_late(adapter_dir, aggregate, late, out)

    # Assert: B @ A is Σ p s B A over all three; the config says r = lora_alpha = 2+3+4
    state, config = read_adapter(out)
    assert_products(state, early + [late])
    assert set(split_factors(state)) == set(MODULE_SHAPES)
    assert (config["r"], config["lora_alpha"]) == (9, 9)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["peft_type"] == "LORA"
    expected = {"combine": "stack", "total-weight": 60.0, "scaling": 1.0}
    assert result == expected
    assert json.loads((out / "aggregate.json").read_text()) == expected
    assert aggregate["total-weight"] == 40.0  # the caller's dict is left as it was


def test_a_second_late_client_folds_into_the_merged_output(tmp_path):
    # Prepare: the output of a first late merge
    early = [random_update(*spec) for spec in EARLY]
    adapter_dir, aggregate = stacked_run(tmp_path / "run" / "adapter", early)
    first, second = random_update(4, 2.0, 20.0, seed=3), random_update(1, 8.0, 5.0, seed=4)
    merged = tmp_path / "merged"
    after_first = merge_late(adapter_dir, aggregate, first, merged)

    # Execute
    merge_late(merged, json.loads((merged / "aggregate.json").read_text()), second,
               tmp_path / "merged-2")

    # Assert
    state, config = read_adapter(tmp_path / "merged-2")
    assert_products(state, early + [first, second])
    assert (config["r"], config["lora_alpha"]) == (10, 10)
    assert after_first["total-weight"] == 60.0
    assert json.loads((tmp_path / "merged-2" / "aggregate.json").read_text())[
        "total-weight"] == 65.0


def averaged_run(folder: Path, updates: list[LoraUpdate]) -> tuple[Path, dict]:
    """A one-shot `combine: average` run (one rank, one scaling) and its aggregate facts."""
    r, scaling = updates[0].rank, updates[0].scaling
    adapter_dir = write_adapter(folder, fedavg_factors(updates), r, scaling * r)
    return adapter_dir, {"combine": "average", "total-weight": sum(u.weight for u in updates),
                         "scaling": scaling}


def test_merge_late_average_equals_averaging_everyone_at_once(tmp_path):
    # Prepare: two rank-2 clients with scaling 2, a late one of the same rank and scaling
    early = [random_update(2, 2.0, 1.0, seed=10), random_update(2, 2.0, 3.0, seed=11)]
    adapter_dir, aggregate = averaged_run(tmp_path / "run", early)
    late = random_update(2, 2.0, 2.0, seed=12)

    # Execute
    result = merge_late(adapter_dir, aggregate, late, tmp_path / "out")

    # Assert: the factors are the average of all three; r and lora_alpha are unchanged
    state, config = read_adapter(tmp_path / "out")
    at_once = fedavg_factors(early + [late])
    for module, (a, b) in split_factors(state).items():
        torch.testing.assert_close(a, at_once[module][0])
        torch.testing.assert_close(b, at_once[module][1])
    assert (config["r"], config["lora_alpha"]) == (2, 4.0)
    assert result == {"combine": "average", "total-weight": 6.0, "scaling": 2.0}


@pytest.mark.parametrize("late_r, late_scaling", [(3, 2.0), (2, 1.0)])
def test_merge_late_average_refuses_another_rank_or_scaling(tmp_path, late_r, late_scaling):
    # Prepare
    early = [random_update(2, 2.0, 1.0, seed=10), random_update(2, 2.0, 3.0, seed=11)]
    adapter_dir, aggregate = averaged_run(tmp_path / "run", early)
    late = random_update(late_r, late_scaling, 4.0, seed=12)

    # Execute / Assert: named, and nothing written
    with pytest.raises(ValueError, match=rf"combine='average'.*r={late_r}, "
                                         rf"scaling={late_scaling}"):
        merge_late(adapter_dir, aggregate, late, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_late_refuses_a_run_that_was_not_one_shot(tmp_path):
    early = [random_update(*spec) for spec in EARLY]
    adapter_dir, _ = stacked_run(tmp_path / "run", early)

    with pytest.raises(ValueError, match="combine='flora'"):
        merge_late(adapter_dir, {"combine": "flora", "total-weight": 40.0, "scaling": 1.0},
                   random_update(2, 1.0, 1.0, seed=5), tmp_path / "out")


@pytest.mark.parametrize("keep, missing", [((), "adapter_model.safetensors"),
                                           (("adapter_model.safetensors",),
                                            "adapter_config.json")])
def test_a_folder_without_adapter_files_is_refused(tmp_path, keep, missing):
    # Prepare: a run folder holding at most the weights
    source = write_adapter(tmp_path / "full", random_update(2, 1.0, 1.0, seed=6).factors, 2, 2)
    folder = tmp_path / "not-an-adapter"
    folder.mkdir()
    for name in keep:
        (folder / name).write_bytes((source / name).read_bytes())

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=missing):
        merge_late(folder, {"combine": "stack", "total-weight": 1.0, "scaling": 1.0},
                   random_update(2, 1.0, 1.0, seed=5), tmp_path / "out")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedapp.tools.late_merge", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_folds_a_late_adapter_folder_into_a_run(tmp_path):
    # Prepare: runs/<run>/adapter + aggregate.json, and a late client's peft folder
    # (r = 3, lora_alpha = 6: scaling 2) with 5 examples
    early = [random_update(*spec) for spec in EARLY]
    run_dir = tmp_path / "run"
    _, aggregate = stacked_run(run_dir / "adapter", early)
    (run_dir / "adapter" / "README.md").write_text("model card")
    (run_dir / "aggregate.json").write_text(json.dumps(aggregate))
    late = random_update(3, 2.0, 5.0, seed=7)
    late_dir = write_adapter(tmp_path / "late", late.factors, 3, 6)
    out = tmp_path / "merged"

    # Execute
    done = run_cli(str(run_dir), "--late-adapter", str(late_dir), "--num-examples", "5",
                   "--out", str(out))

    # Assert
    assert done.returncode == 0, done.stderr
    assert "total weight now 45" in done.stdout
    state, config = read_adapter(out)
    assert_products(state, early + [late])
    assert (config["r"], config["lora_alpha"]) == (8, 8)
    assert json.loads((out / "aggregate.json").read_text())["total-weight"] == 45.0
    assert (out / "README.md").read_text() == "model card"


def test_cli_late_adapter_without_num_examples_exits_non_zero(tmp_path):
    # Prepare
    early = [random_update(*spec) for spec in EARLY]
    run_dir = tmp_path / "run"
    _, aggregate = stacked_run(run_dir / "adapter", early)
    (run_dir / "aggregate.json").write_text(json.dumps(aggregate))
    late_dir = write_adapter(tmp_path / "late", random_update(3, 2.0, 5.0, seed=7).factors, 3, 6)

    # Execute
    done = run_cli(str(run_dir), "--late-adapter", str(late_dir), "--out",
                   str(tmp_path / "merged"))

    # Assert
    assert done.returncode != 0
    assert "--num-examples" in done.stderr
    assert not (tmp_path / "merged").exists()
