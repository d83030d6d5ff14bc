"""A whole deployment on one machine: a SuperLink (TLS + SuperNode authentication) and
SuperNodes as separate processes on 127.0.0.1, started through `scripts/deploy/`.

Used by the deployment tests and the deployment benchmark. Every process it starts (and the
SuperExec/app processes those start) is stopped by pid in `stop_all`.
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

from fedapp.tools.deploy import (
    descendants,
    start_process,
    stop_process,
    wait_for_port,
    write_node_key,
    write_tls,
)
from fedapp.tools.submit import flower_env, flwr_cli, free_port

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "deploy"
CONNECTION = "loopback"


class LoopbackFederation:
    """One SuperLink (TLS, `--enable-supernode-auth`) and its SuperNodes on 127.0.0.1."""

    def __init__(self, root: Path, app: Path) -> None:
        self.root = root
        self.app = app
        self.procs: dict[str, subprocess.Popen] = {}
        self.cli_env = flower_env(root / "cli-home")
        self.tls = write_tls(root / "certs")
        self.address = ""
        self.extra_env: dict[str, str] = {}  # e.g. settings the SuperNodes' clients see

    def start_superlink(self, port: int | None = None, database: str | None = None) -> None:
        """Start the SuperLink (again, on the same port and state database, when `port` is
        the one it had: registered SuperNodes reconnect on their own). `database`: its
        state (default: a file under its FLWR_HOME; ":flwr-in-memory:" keeps it in memory)."""
        port = port or free_port()
        self.address = f"127.0.0.1:{port}"
        proc = self._start("superlink", [
            SCRIPTS / "superlink.sh", "--certs", self.root / "certs", "--host", "127.0.0.1",
            "--port", str(port), *(["--database", database] if database else [])])
        wait_for_port("127.0.0.1", port, timeout=60, proc=proc)
        self._script("connection.sh", CONNECTION, self.address, str(self.tls.ca_cert))

    def start_supernodes(self, num_nodes: int) -> None:
        """Register one key per SuperNode, start them, wait until all are online."""
        keys = [self.key(i) for i in range(num_nodes)]
        self._script("register.sh", CONNECTION, *(str(write_node_key(k)) for k in keys))
        for i in range(num_nodes):
            self.start_supernode(i, num_nodes)
        self.wait_online(num_nodes, timeout=90 + 2 * num_nodes)

    def key(self, i: int) -> Path:
        return self.root / "keys" / f"supernode-{i}"

    def start_supernode(self, i: int, num_nodes: int) -> None:
        """SuperNode `i` of `num_nodes` with its registered key (again, after a kill)."""
        self._start(f"supernode-{i}", [
            SCRIPTS / "supernode.sh", "--superlink", self.address, "--ca", self.tls.ca_cert,
            "--key", self.key(i), "--partition-id", str(i), "--num-partitions", str(num_nodes),
            "--port", str(free_port())])

    def wait_online(self, num_nodes: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (online := self.online_nodes()) < num_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{online}/{num_nodes} SuperNodes online\n{self.logs()}")
            time.sleep(1)

    def online_nodes(self) -> int:
        out = subprocess.run([flwr_cli(), "supernode", "ls", CONNECTION, "--format", "json"],
                             env=self.cli_env, capture_output=True, text=True, check=False)
        try:
            nodes = json.loads(out.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            return 0
        return sum(n["status"] == "online" for n in nodes)

    def submit(self, overrides: str, run_dir: Path, name: str = "submit") -> subprocess.Popen:
        """`python -m fedapp.tools.submit` against this SuperLink; output in <name>.log."""
        return self._start(name, [
            sys.executable, "-m", "fedapp.tools.submit", "--app", self.app, "--superlink", CONNECTION,
            "--overrides", overrides, "--run-dir", run_dir], env=self.cli_env)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} still running after {timeout:.0f} s\n{self.logs()}")

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

    def freeze(self, name: str, frozen: bool = True, only: str | None = None) -> None:
        """SIGSTOP (or SIGCONT) a process and everything it started: a machine that hangs,
        or that comes back. `only`: just the processes it started whose command line holds
        that text (e.g. "flwr-clientapp": an app that hangs on a node that stays up)."""
        proc = self.procs[name]
        family = [psutil.Process(proc.pid), *descendants(proc.pid)]
        for p in family:
            try:
                if only is None or only in " ".join(p.cmdline()):
                    p.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # submit, SuperNodes, then the SuperLink
            stop_process(self.procs[name], timeout=10)

    def _start(self, name: str, cmd: list, env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        env = env or {**flower_env(self.root / f"{name}-home"), **self.extra_env}
        proc = start_process([str(c) for c in cmd], self.root / "logs" / f"{name}.log", env,
                             cwd=self.root)
        self.procs[name] = proc
        return proc

    def _script(self, script: str, *args: str) -> None:
        out = subprocess.run([str(SCRIPTS / script), *args], env=self.cli_env, cwd=self.root,
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{out.stdout}\n{out.stderr}")
