"""A run whose server is killed mid-run resumes from its checkpoint and ends exactly where an
uninterrupted run with the same seeds ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedapp.config import load_run_config, run_setup
from fedapp.server.checkpoint import CHECKPOINT
from fedapp.server.report import read_metrics
from fedapp.tools.submit import flower_env, local_superlink_pids, run_submit
from strategies.base import config_bytes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def pids_matching(*needles: str) -> list[int]:
    """Pids whose command line contains every needle (ours: the needles hold our port)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if all(n in cmd for n in needles):
                found.append(int(proc.name))
    return found


def kill_federation(env: dict, sig: int = signal.SIGKILL) -> None:
    """The SuperLink, its executor and the ServerApp process of this test's federation."""
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    pids = set(local_superlink_pids(env["FLWR_HOME"]))
    pids |= set(pids_matching("flwr-simulation", f"127.0.0.1:{port}"))
    pids |= set(pids_matching("flower-superexec", f"127.0.0.1:{port}"))
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture()
def envs(tmp_path):
    made = []

    def make(name: str) -> dict:
        made.append(flower_env(tmp_path / name, isolated_ports=True))
        return made[-1]

    yield make
    for env in made:
        kill_federation(env, signal.SIGTERM)


def overrides(tiny: Path) -> str:
    return (f"model.path={tiny} scenario=two_clients num_rounds=3 train.local_steps=25 "
            "train.lr=0.01 train.max_length=64 eval.max_examples=16 partitioner=iid "
            "strategy.ranks=[2,4] strategy.rank_budget=8")


def test_killed_server_resumes_to_the_same_adapter(tiny_model_dir, tmp_path, envs):
    whole = run_submit(ROOT, 2, overrides(tiny_model_dir), tmp_path / "whole", envs("a"),
                       timeout=900)
    assert whole.returncode == 0, whole.stdout[-2000:]

    env = envs("b")
    run_dir = tmp_path / "crashed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedapp.tools.submit", "--app", str(ROOT), "--num-supernodes", "2",
         "--overrides", overrides(tiny_model_dir), "--run-dir", str(run_dir)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (run_dir / CHECKPOINT).exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-2000:]
            time.sleep(0.05)
        kill_federation(env)  # the server dies somewhere in round 2
        done_before_kill = torch.load(run_dir / CHECKPOINT, weights_only=False)["server_round"]
    finally:
        proc.wait(timeout=120)
    assert done_before_kill < 3, "the run finished before it could be killed"
    assert not (run_dir / "adapter").exists()

    resumed = run_submit(ROOT, 2, f"resume={run_dir}", tmp_path / "resume-log", envs("c"),
                         timeout=900)

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    expected = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")
    rows_whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    rows_resumed = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows_resumed] == [0, 1, 2, 3]
    # The resumed run is a new Flower run: in its first round both clients get the run setup
    # again (their context state is new) and all of the global instead of the increment of
    # the round before (strategies/flora.py): the only traffic that differs.
    setup_bytes = config_bytes(run_setup(load_run_config(run_dir)).to_config())
    extra = 0
    for a, b in zip(rows_whole, rows_resumed):
        resent = 0
        if a["round"] == done_before_kill + 1:
            for name, client in b["clients"].items():
                assert client["bytes-down"] > a["clients"][name]["bytes-down"] + setup_bytes
            resent = b["bytes-down"] - a["bytes-down"]
        extra += resent
        assert b["eval-loss"] == pytest.approx(a["eval-loss"], rel=1e-5)
        assert b["train-loss"] == pytest.approx(a["train-loss"], rel=1e-5, abs=1e-9) \
            if a["train-loss"] is not None else b["train-loss"] is None
        assert (b["bytes-up"], b["bytes-down"], b["cum-mb"]) == (
            a["bytes-up"], a["bytes-down"] + resent, pytest.approx(a["cum-mb"] + extra / 2**20))


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    from fedapp.server.checkpoint import load_checkpoint

    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        load_checkpoint(tmp_path)
