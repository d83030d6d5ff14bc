"""End to end through the real Flower runtime: `flwr run` on a local simulation SuperLink.

Each test uses its own $FLWR_HOME and free loopback ports, and stops the SuperLink it
started by pid, pass or fail.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from peft import AutoPeftModelForCausalLM, PeftModel

from fedapp.config import compose_config, data_spec
from fedapp.llm.model import disable_bnb_cpu_repack, load_base, load_tokenizer
from fedapp.llm.train import eval_loss
from fedapp.llm.unequal import load_pretrained
from fedapp.pruning.surgery import parameter_count
from fedapp.server.evaluate import heldout_examples
from fedapp.server.report import read_metrics
from fedapp.tools.submit import flower_env, local_superlink_pids, run_submit
from tests.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture()
def flwr_env(tmp_path):
    env = flower_env(tmp_path / "flwr-home", isolated_ports=True)
    yield env
    for pid in local_superlink_pids(env["FLWR_HOME"]):  # only ours, even if a test failed
        os.kill(pid, signal.SIGTERM)


def submit(env: dict, overrides: str, run_dir: Path, clients: int = 2):
    return run_submit(ROOT, clients, overrides, run_dir, env, timeout=900)


@pytest.mark.parametrize("strategy, quantization", [
    ("flora", "nf4"), ("fedit", "nf4"), ("flora", "nf4-embeddings")])
def test_flwr_run_fine_tunes_the_tiny_model(strategy, quantization, tiny_model_dir, tmp_path,
                                            flwr_env):
    overrides = (f"strategy={strategy} model.path={tiny_model_dir} scenario=two_clients "
                 "num_rounds=2 train.local_steps=8 train.lr=0.01 train.max_length=64 "
                 f"eval.max_examples=16 partitioner=iid model.quantization={quantization}")
    if strategy == "flora":
        overrides += " strategy.ranks=[2,4]"

    proc = submit(flwr_env, overrides, tmp_path / "run")

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"]
    for row in rows[1:]:
        assert row["accepted"] == 2 and row["bytes-up"] > 0 and row["bytes-down"] > 0
        assert {c["status"] for c in row["clients"].values()} == {"ok"}
        # Ray's workers inherit flower_env's preload: the clients ran on jemalloc
        assert {c["jemalloc"] for c in row["clients"].values()} == {1.0}
    if strategy == "flora":
        assert sorted(c["r"] for c in rows[1]["clients"].values()) == [2, 4]
        assert rows[2]["global-rank"] == 12
    else:
        assert rows[1]["aggregation-noise"] > 0
    assert (tmp_path / "run" / "eval_loss.png").stat().st_size > 0

    cfg = compose_config(overrides)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = heldout_examples(data_spec(cfg), tokenizer, 64, 16)
    model = PeftModel.from_pretrained(load_base(str(tiny_model_dir), quantization, "cpu"),
                                      tmp_path / "run" / "adapter")
    loss = eval_loss(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id)
    assert abs(loss - rows[-1]["eval-loss"]) <= 0.01 * rows[-1]["eval-loss"]


def test_flwr_run_fedspine_on_unequal_devices(tiny_model_dir, tmp_path, flwr_env):
    overrides = (f"strategy=fedspine scenario=phones_laptops_edge model.path={tiny_model_dir} "
                 "num_rounds=2 train.local_steps=6 train.lr=0.01 train.max_length=64 "
                 "eval.max_examples=16 partitioner=iid strategy.prune.tune_steps=2 "
                 "eval.deployed_every=1")

    proc = submit(flwr_env, overrides, tmp_path / "run", clients=4)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"]
    # the phones' target: the least their 2050 MB need at rank 4, 1 - (2050 - 1730 - 2·4) /
    # 530 = 0.411 -> 0.42; laptops and edge boxes fit unpruned: 0
    targets = {"phone": 0.42, "laptop": 0.0, "edge": 0.0}
    for row in rows[1:]:
        assert row["accepted"] == 4
        for name, client in row["clients"].items():
            assert client["status"] == "ok" and math.isfinite(client["reward"])
            assert client["prune-ratio"] == client["train-ratio"] <= targets[client["device"]]
            if client["device"] == "phone":  # its memory budget: at least 0.411 at rank 4
                assert client["prune-ratio"] >= 0.411, name
    for client in rows[-1]["clients"].values():  # every device at its target at the end
        assert client["prune-ratio"] == targets[client["device"]]
    slowest = [max(c["completion-seconds"] for c in row["clients"].values()) for row in rows[1:]]
    assert rows[-1]["sim-seconds"] == pytest.approx(sum(slowest), abs=0.02)  # rounded 0.01 s
    phones = [c for c in rows[1]["clients"].values() if c["device"] == "phone"]
    assert all(c["completion-seconds"] > 4 * c["train-seconds"] for c in phones)  # slowdown 4
    assert any(c["params-ratio"] < 1 for c in rows[1]["clients"].values())
    saved = json.loads((tmp_path / "run" / "aggregate.json").read_text())
    assert set(saved["bandits"]["clients"]) == {f"partition-{i}" for i in range(4)}
    # every device's deployed model loads in one call, with its adapter, and is evaluated
    deployed = json.loads((tmp_path / "run" / "devices" / "summary.json").read_text())
    assert set(deployed) == {f"partition-{i}" for i in range(4)}
    cfg = compose_config(overrides)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = heldout_examples(data_spec(cfg), tokenizer, 64, 16)
    for name, info in deployed.items():
        assert info["reached"] == info["target"] == targets[info["device"]], name
        model = AutoPeftModelForCausalLM.from_pretrained(
            tmp_path / "run" / "devices" / name / "adapter")
        disable_bnb_cpu_repack(model)  # the training path's numerics (see README)
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert parameter_count(model) - lora == info["params"], name
        assert (info["params-ratio"] < 1) == (info["device"] == "phone"), name
        loss = eval_loss(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id)
        assert loss == pytest.approx(info["eval-loss"], rel=1e-4), name
        # evaluated every round too (eval.deployed_every=1); the last round's is the export's
        assert rows[-1][f"{name}/eval-loss"] == pytest.approx(info["eval-loss"], rel=1e-6)
    losses = [info["eval-loss"] for info in deployed.values()]
    assert rows[-1]["deployed-eval-loss-worst"] == pytest.approx(max(losses), rel=1e-6)
    assert all("deployed-eval-loss-mean" in row for row in rows[1:])


@pytest.mark.parametrize("strategy", ["flora", "fedit", "zeropad", "flexlora", "ffa", "oneshot",
                                      "fedspine", "centralized", "fedkseed", "fedpipe",
                                      "fedbiot"])
def test_every_strategy_completes_under_partial_participation(strategy, tiny_model_dir,
                                                             tmp_path, flwr_env):
    """scenario=partial: 2 of 4 clients a round, so a round can miss the highest rank (the
    case that made zero-padding shrink its global and reject that client afterwards)."""
    overrides = (f"strategy={strategy} model.path={tiny_model_dir} scenario=partial "
                 "num_rounds=3 train.local_steps=2 train.lr=0.01 train.max_length=64 "
                 "eval.max_examples=8 partitioner=iid")
    if strategy in ("flora", "zeropad", "flexlora"):
        overrides += " strategy.ranks=[2,4,8,4]"
    if strategy == "fedbiot":  # 4 layers: the emulator keeps 1 of the 3 below the adapter
        deep = build_tiny_model(tmp_path / "deep", layers=4)
        overrides = overrides.replace(f"model.path={tiny_model_dir}", f"model.path={deep}") + (
            " strategy.adapter_layers=1 strategy.emulator_layers=1 strategy.rank=4 "
            "strategy.align_steps=2 strategy.public_examples=4")

    proc = submit(flwr_env, overrides, tmp_path / "run", clients=4)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(len(rows)))
    assert len(rows) == (2 if strategy == "oneshot" else 4)
    for row in rows[1:]:
        assert row["clients"] and {c["status"] for c in row["clients"].values()} == {"ok"}
        assert row["accepted"] == len(row["clients"]) and math.isfinite(row["eval-loss"])
        if strategy == "fedbiot":  # rank 4 on the adapter layer's q, o (64 x 64), k, v (32 x 64)
            assert {c["lora-params"] for c in row["clients"].values()} == {
                2 * 4 * (64 + 64) + 2 * 4 * (32 + 64)}
        if strategy == "fedkseed":  # a pair per step up, K = 1024 float64 scalars down
            assert all(c["bytes-up"] < 1024 and c["bytes-down"] < 16 * 1024
                       for c in row["clients"].values())


@pytest.mark.parametrize("strategy", ["flora", "fedspine"])
@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_flwr_run_on_other_model_families(family, strategy, tmp_path, flwr_env):
    """A round of a tiny Gemma-3 (BOS, tied embeddings, q/k norms, sliding window) and a tiny
    Qwen2 (q/k/v biases, ChatML template): FLoRA, and FedSpine pruning every client by half."""
    path = build_tiny_model(tmp_path / family, family=family)
    overrides = (f"strategy={strategy} model.path={path} scenario=two_clients num_rounds=1 "
                 "train.local_steps=4 train.lr=0.01 train.max_length=64 eval.max_examples=8 "
                 "eval.ranking_examples=4 eval.generate_examples=1 eval.generate_tokens=4 "
                 "partitioner=iid")
    if strategy == "fedspine":
        overrides += (" strategy.bandit.prune_ratios=[0.5] strategy.bandit.ranks=[4] "
                      "strategy.prune.tune_steps=1 +scenario.devices={dev:{sparsity:0.5}} "
                      "+scenario.device_of_client=[dev]")
    else:
        overrides += " strategy.ranks=[2,4]"

    proc = submit(flwr_env, overrides, tmp_path / "run")

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["accepted"] == 2
    assert all(math.isfinite(r["eval-loss"]) and "eval-rank-accuracy" in r for r in rows)
    if strategy == "fedspine":
        assert all(c["params-ratio"] < 0.9 for c in rows[1]["clients"].values())
    saved = json.loads((tmp_path / "run" / "generations.json").read_text())
    assert set(saved) == {"rouge-l-base", "rouge-l-final", "examples"}
    model = PeftModel.from_pretrained(load_base(str(path), "nf4", "cpu"),
                                      tmp_path / "run" / "adapter")
    # the stacked global rank: 2 + 4 (FLoRA's ranks), 4 + 4 (FedSpine's single arm)
    assert model.peft_config["default"].r == (8 if strategy == "fedspine" else 6)


def test_flwr_run_fedspine_with_a_global_allocation_exports_unequal_layers(
        tiny_model_dir, tmp_path, flwr_env):
    """FedSpine whose devices rank units across layers (strategy.prune.allocation=global):
    the run completes, each device reaches its sparsity, and its deployed model, whose
    layers may differ in shape, loads with fedapp.llm.unequal.load_pretrained as what the
    server evaluated."""
    overrides = (f"strategy=fedspine model.path={tiny_model_dir} scenario=two_clients "
                 "num_rounds=1 train.local_steps=4 train.lr=0.01 train.max_length=64 "
                 "eval.max_examples=8 partitioner=iid strategy.prune.tune_steps=1 "
                 "strategy.prune.allocation=global strategy.bandit.prune_ratios=[0.5] "
                 "strategy.bandit.ranks=[4] +scenario.devices={dev:{sparsity:0.5}} "
                 "+scenario.device_of_client=[dev]")

    proc = submit(flwr_env, overrides, tmp_path / "run")

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deployed = json.loads((tmp_path / "run" / "devices" / "summary.json").read_text())
    cfg = compose_config(overrides)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = heldout_examples(data_spec(cfg), tokenizer, 64, 8)
    for name, info in deployed.items():
        assert info["reached"] == info["target"] == 0.5 and info["params-ratio"] < 0.9, name
        model = load_pretrained(tmp_path / "run" / "devices" / name)
        disable_bnb_cpu_repack(model)  # the training path's numerics (see README)
        loss = eval_loss(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id)
        assert loss == pytest.approx(info["eval-loss"], rel=1e-4), name


def test_a_failed_run_makes_the_wrapper_exit_non_zero(tiny_model_dir, tmp_path, flwr_env):
    overrides = f"model.path={tiny_model_dir} scenario=two_clients dataset.response_column=nope"

    proc = submit(flwr_env, overrides, tmp_path / "run")

    assert proc.returncode == 1
    assert "finished:failed" in proc.stdout
