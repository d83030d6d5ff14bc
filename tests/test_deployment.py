"""Real deployment on 127.0.0.1: a SuperLink and SuperNodes as separate processes, TLS and
SuperNode authentication, started through `scripts/deploy/` and driven by `fedapp.submit`.

Every process a test starts (and the SuperExec/app processes those start) is stopped by pid
at the end, pass or fail. All state (Flower homes, databases, certificates, run dirs) lives
under `tmp_path`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedapp.deploy import descendants, start_process, stop_process, wait_for_port, write_tls
from fedapp.deploy import write_node_key
from fedapp.report import read_metrics
from fedapp.submit import flower_env, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "deploy"
CONNECTION = "deploy-test"
TINY_RUN = ("scenario=two_clients train.max_length=64 eval.max_examples=16 partitioner=iid "
            "strategy.ranks=[2,4]")

pytestmark = pytest.mark.slow


class Federation:
    """One SuperLink (TLS, `--enable-supernode-auth`) and its SuperNodes on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.cli_env = flower_env(root / "cli-home")
        self.tls = write_tls(root / "certs")
        self.address = ""

    def start_superlink(self) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        proc = self._start("superlink", [SCRIPTS / "superlink.sh", "--certs", self.root / "certs",
                                         "--host", "127.0.0.1", "--port", str(port)])
        wait_for_port("127.0.0.1", port, timeout=60, proc=proc)
        self._script("connection.sh", CONNECTION, self.address, str(self.tls.ca_cert))

    def start_supernodes(self, num_nodes: int) -> None:
        """Register one key per SuperNode, start them, wait until all are online."""
        keys = [self.root / "keys" / f"supernode-{i}" for i in range(num_nodes)]
        self._script("register.sh", CONNECTION, *(str(write_node_key(k)) for k in keys))
        for i, key in enumerate(keys):
            self._start(f"supernode-{i}", [
                SCRIPTS / "supernode.sh", "--superlink", self.address, "--ca", self.tls.ca_cert,
                "--key", key, "--partition-id", str(i), "--num-partitions", str(num_nodes),
                "--port", str(free_port())])
        deadline = time.monotonic() + 90
        while (online := self.online_nodes()) < num_nodes:
            assert time.monotonic() < deadline, f"{online}/{num_nodes} online\n{self.logs()}"
            time.sleep(1)

    def online_nodes(self) -> int:
        out = subprocess.run(["flwr", "supernode", "ls", CONNECTION, "--format", "json"],
                             env=self.cli_env, capture_output=True, text=True, check=False)
        try:
            nodes = json.loads(out.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            return 0
        return sum(n["status"] == "online" for n in nodes)

    def submit(self, overrides: str, run_dir: Path) -> subprocess.Popen:
        """`python -m fedapp.submit` against this SuperLink; output in submit.log."""
        return self._start("submit", [
            sys.executable, "-m", "fedapp.submit", "--app", ROOT, "--superlink", CONNECTION,
            "--overrides", overrides, "--run-dir", run_dir], env=self.cli_env)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running after {timeout:.0f} s\n{self.logs()}")

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def logs(self, tail: int = 2500) -> str:
        return "\n".join(f"----- {name}\n{self.log(name)[-tail:]}" for name in self.procs)

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started: a machine that vanished."""
        proc = self.procs[name]
        family = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # submit, SuperNodes, then the SuperLink
            stop_process(self.procs[name], timeout=10)

    def _start(self, name: str, cmd: list, env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        env = env or flower_env(self.root / f"{name}-home")
        proc = start_process([str(c) for c in cmd], self.root / "logs" / f"{name}.log", env,
                             cwd=self.root)
        self.procs[name] = proc
        return proc

    def _script(self, script: str, *args: str) -> None:
        out = subprocess.run([str(SCRIPTS / script), *args], env=self.cli_env, cwd=self.root,
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, f"{script} failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture()
def federation(tmp_path):
    fed = Federation(tmp_path)
    yield fed
    fed.stop_all()


def wait_for_line(fed: Federation, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in fed.log(name):
        if time.monotonic() > deadline or fed.procs["submit"].poll() is not None:
            pytest.fail(f"'{text}' never appeared in {name}'s log\n{fed.logs()}")
        time.sleep(0.5)


def test_two_supernodes_fine_tune_over_tls_with_node_auth(tiny_model_dir, tmp_path, federation):
    federation.start_superlink()
    federation.start_supernodes(2)

    run_dir = tmp_path / "run"
    overrides = f"model.path={tiny_model_dir} {TINY_RUN} num_rounds=2 train.local_steps=4"
    federation.submit(overrides, run_dir)

    assert federation.wait("submit", timeout=240) == 0, federation.logs()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["accepted"] == 2
        assert {c["status"] for c in row["clients"].values()} == {"ok"}
        assert sorted(row["clients"]) == ["partition-0", "partition-1"]
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"]
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert "finished:completed" in federation.log("submit")


def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(
        tiny_model_dir, tmp_path, federation):
    federation.start_superlink()
    federation.start_supernodes(3)

    run_dir = tmp_path / "run"
    overrides = (f"model.path={tiny_model_dir} {TINY_RUN} num_rounds=1 train.local_steps=8 "
                 "scenario.num_clients=3 scenario.min_train_nodes=2 round_timeout=60")
    federation.submit(overrides, run_dir)
    # The victim's ClientApp logs this line just before its local training starts.
    wait_for_line(federation, "supernode-2", "Client 2: ", timeout=150)
    federation.kill("supernode-2")

    assert federation.wait("submit", timeout=180) == 0, federation.logs()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    clients = rows[1]["clients"]
    assert rows[1]["accepted"] == 2
    assert clients["partition-0"]["status"] == clients["partition-1"]["status"] == "ok"
    victim = clients["partition-2"]["status"]
    assert victim == "no reply" or victim.startswith("rejected: client error"), victim
    # The SuperLink answers for a node that stopped sending heartbeats with an error reply
    # from node 1 (itself); until the strategy maps it back by reply_to_message_id it is an
    # extra entry. Nothing else may appear.
    others = {n: c["status"] for n, c in clients.items() if not n.startswith("partition-")}
    assert all(n == "node-1" and s.startswith("rejected: client error")
               for n, s in others.items()), others
    assert (run_dir / "adapter" / "adapter_config.json").exists()
