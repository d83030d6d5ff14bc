"""Submit a run with `flwr run`, stream its logs, and exit non-zero if it failed.

`flwr run --stream` exits 0 even when the run ends `finished:failed`, so this wrapper asks
the SuperLink for the run's final status and turns it into the exit code.

    python -m fedapp.tools.submit --app . --superlink local --num-supernodes 4 \
        --overrides "strategy=fedit" --run-dir runs/try1

For the auto-started local simulation SuperLink (`--superlink local`), the wrapper stops that
SuperLink at the end if it was not running before (it is found by pid through its database
under $FLWR_HOME, so no other process is touched).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedapp.console import stale_notice
from fedapp.tools.allocator import allocator_env

FINAL_OK = "finished:completed"


def flower_env(flwr_home: str | Path, isolated_ports: bool = False) -> dict[str, str]:
    """Environment for the `flwr` CLI: a private Flower home, no telemetry, no per-run
    dependency install (it would pull CUDA torch), offline hubs, Ray's coming default for
    actors without GPUs (leave the accelerator variables alone; said explicitly, Ray stops
    warning that the default will change). `isolated_ports` picks free loopback ports for
    the local SuperLink so that several can coexist (tests, sweeps). The processes it starts
    run on jemalloc where one is installed (`fedapp.tools.allocator`)."""
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if isolated_ports:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    return allocator_env(env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_submit(app: str | Path, num_supernodes: int, overrides: str, run_dir: str | Path,
               env: dict[str, str], superlink: str = "local",
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """This module's CLI in a subprocess (its own environment): submit, stream, wait.

    The subprocess runs in `run_dir`'s parent, so a relative `run_dir` is made absolute
    first (it once landed at parent/run_dir, where the caller did not look)."""
    run_dir = Path(run_dir).resolve()
    return subprocess.run(
        [sys.executable, "-m", "fedapp.tools.submit", "--app", str(app), "--superlink", superlink,
         "--num-supernodes", str(num_supernodes), "--overrides", overrides,
         "--run-dir", str(run_dir)],
        env=env, cwd=Path(run_dir).parent, capture_output=True, text=True, timeout=timeout,
        check=False)


def flwr_cli() -> str:
    """The Flower CLI: the `flwr` beside this interpreter (the venv's, even when the venv is
    not activated), else the one on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    if found := shutil.which("flwr"):
        return found
    raise FileNotFoundError(
        f"the Flower CLI `flwr` is neither beside this Python ({beside}) nor on PATH; allowed: "
        "the project's interpreter (.venv/bin/python, which scripts/setup.sh installs with "
        "flwr) or an environment with `flwr` on PATH")


def cli_env() -> dict[str, str]:
    """This environment with the CLI's folder first on PATH: `flwr` starts the local
    SuperLink (`flower-superlink`) and simulation processes from there."""
    return dict(os.environ, PATH=f"{Path(flwr_cli()).parent}:{os.environ.get('PATH', '')}")


def flwr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([flwr_cli(), *args], capture_output=True, text=True, check=False,
                          env=cli_env())


def local_superlink_pids(flwr_home: str | None = None) -> list[int]:
    """Pids of the local simulation SuperLink tied to `flwr_home` (default $FLWR_HOME)."""
    home = flwr_home or os.environ.get("FLWR_HOME", str(Path.home() / ".flwr"))
    db = str(Path(home) / "local-superlink" / "state.db")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in c for c in cmd) and db.encode() in cmd:
            pids.append(int(proc.name))
    return pids


def stream_log(run_id: str, superlink: str) -> None:
    """`flwr log --stream` to our stdout, less flwr's `stale_notice` lines."""
    with subprocess.Popen([flwr_cli(), "log", run_id, superlink, "--stream"], text=True,
                          stdout=subprocess.PIPE, bufsize=1, env=cli_env()) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not stale_notice(line):
                sys.stdout.write(line)
                sys.stdout.flush()


def run_status(run_id: str, superlink: str) -> str:
    out = flwr("ls", superlink, "--run-id", run_id, "--format", "json")
    try:
        return json.loads(out.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown"


def wait_until_finished(run_id: str, superlink: str, unreachable_for: float = 300.0,
                        every: float = 5.0) -> str:
    """The run's final status. The log stream can end before the run does (a moment before,
    or long before when a loaded SuperLink drops the stream): keep asking while the run is
    still going, and give up only once the SuperLink has been unreachable for
    `unreachable_for` seconds in a row (then the status is "unknown")."""
    status, said, lost_since = run_status(run_id, superlink), "", None
    while not status.startswith("finished"):
        if status == "unknown":
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > unreachable_for:
                break
        else:
            lost_since = None
        if status != said:
            print(f"[submit] the log stream ended; run {run_id} is {status}, waiting for it to "
                  "finish", flush=True)
            said = status
        time.sleep(every)
        status = run_status(run_id, superlink)
    return status


def submit(app: str, superlink: str, run_config: str, federation_config: str) -> str:
    args = ["run", app, superlink, "--run-config", run_config, "--format", "json"]
    if federation_config:
        args += ["--federation-config", federation_config]
    out = flwr(*args)
    try:
        reply = json.loads(out.stdout)
    except json.JSONDecodeError:
        sys.exit(f"flwr run failed:\n{out.stdout}\n{out.stderr}")
    if not reply.get("success"):
        sys.exit(f"flwr run was refused: {reply}")
    return str(reply["run-id"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=".")
    parser.add_argument("--superlink", default="local")
    parser.add_argument("--num-supernodes", type=int, default=0,
                        help="simulation only: number of simulated clients")
    parser.add_argument("--overrides", default="", help="Hydra overrides, space-separated")
    parser.add_argument("--run-dir", default="", help="where the server writes results")
    args = parser.parse_args()

    was_running = set(local_superlink_pids())
    run_config = f'overrides="{args.overrides}" run-dir="{args.run_dir}"'
    federation = f"num-supernodes={args.num_supernodes}" if args.num_supernodes else ""
    run_id = submit(args.app, args.superlink, run_config, federation)
    print(f"[submit] run {run_id} submitted to '{args.superlink}'", flush=True)
    try:
        stream_log(run_id, args.superlink)
        status = wait_until_finished(run_id, args.superlink)
    finally:
        if args.superlink == "local":
            for pid in set(local_superlink_pids()) - was_running:
                os.kill(pid, signal.SIGTERM)
    print(f"[submit] run {run_id}: {status}", flush=True)
    return 0 if status == FINAL_OK else 1


if __name__ == "__main__":
    sys.exit(main())
