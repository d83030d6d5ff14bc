"""Real deployment on 127.0.0.1: a SuperLink and SuperNodes as separate processes, TLS and
SuperNode authentication, started through `scripts/deploy/` and driven by `fedapp.submit`
(slow); and the credentials and CLI connection checked against what flwr reads (fast).

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
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import try_load_public_key

from fedapp.deploy import (
    descendants,
    start_process,
    stop_process,
    wait_for_port,
    write_connection,
    write_node_key,
    write_tls,
)
from fedapp.report import read_metrics
from fedapp.submit import flower_env, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "deploy"
CONNECTION = "deploy-test"
TINY_RUN = ("scenario=two_clients train.max_length=64 eval.max_examples=16 partitioner=iid "
            "strategy.ranks=[2,4]")


# ---------------------------------------------------------------------- credentials, fast
def test_superlink_certificate_names_its_hosts_and_is_signed_by_the_ca(tmp_path):
    tls = write_tls(tmp_path, ["flower.example.org", "10.0.0.5"])

    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["flower.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5",
                                                                           "127.0.0.1"]
    assert tls.server_key.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError, match="ca.crt"):
        write_tls(tmp_path)


def test_node_key_pair_is_what_flower_accepts(tmp_path):
    public_path = write_node_key(tmp_path / "supernode-0")

    private = load_ssh_private_key((tmp_path / "supernode-0").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert try_load_public_key(public_path)  # what `flwr supernode register` does


def test_connections_are_read_back_by_the_flwr_cli(tmp_path, monkeypatch):
    (tmp_path / "ca.crt").write_text("pem")
    write_connection(tmp_path, "tls", "flower.example.org:8000", tmp_path / "ca.crt")
    write_connection(tmp_path, "plain", "127.0.0.1:8000", insecure=True)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))

    tls, plain = read_superlink_connection("tls"), read_superlink_connection("plain")

    assert (tls.address, tls.root_certificates, tls.insecure) == (
        "flower.example.org:8000", str((tmp_path / "ca.crt").resolve()), False)
    assert (plain.address, plain.root_certificates, plain.insecure) == (
        "127.0.0.1:8000", None, True)
    assert read_superlink_connection("local").address  # flwr's defaults are kept
    with pytest.raises(ValueError, match="exactly one"):
        write_connection(tmp_path, "neither", "127.0.0.1:8000")


# ---------------------------------------------------------------------- real processes


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(
        tiny_model_dir, tmp_path, federation):
    federation.start_superlink()
    federation.start_supernodes(3)

    run_dir = tmp_path / "run"
    # One round: a later round would wait for scenario.num_clients=3 live nodes again.
    # round_timeout leaves the survivors time on a loaded 2-core machine. The SuperLink gives
    # up on a dead node 60 s after its last heartbeat (sent every 17-23 s): 37-60 s after it.
    overrides = (f"model.path={tiny_model_dir} {TINY_RUN} num_rounds=1 train.local_steps=8 "
                 "scenario.num_clients=3 scenario.min_train_nodes=2 round_timeout=90")
    federation.submit(overrides, run_dir)
    # The victim's ClientApp logs this line just before its local training starts.
    wait_for_line(federation, "supernode-2", "Client 2: ", timeout=240)
    federation.kill("supernode-2")

    assert federation.wait("submit", timeout=240) == 0, federation.logs()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    clients = rows[1]["clients"]
    assert rows[1]["accepted"] == 2
    assert sorted(clients) == ["partition-0", "partition-1", "partition-2"]
    assert clients["partition-0"]["status"] == clients["partition-1"]["status"] == "ok"
    # Either the SuperLink's error reply for a node without heartbeats (mapped back to the
    # node it stands for), or nothing before round_timeout.
    victim = clients["partition-2"]["status"]
    assert victim == "no reply" or "Node Unavailable" in victim, victim
    assert (run_dir / "adapter" / "adapter_config.json").exists()
