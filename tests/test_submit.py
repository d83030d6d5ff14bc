"""The Flower CLI is found beside the project's interpreter, activated venv or not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedapp.tools import submit
from tests.conftest import ROOT


def test_flwr_is_found_beside_the_interpreter_without_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")

    assert submit.flwr_cli() == str(Path(sys.executable).parent / "flwr")
    assert submit.cli_env()["PATH"].startswith(f"{Path(sys.executable).parent}:")


def test_without_flwr_anywhere_the_error_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))

    with pytest.raises(FileNotFoundError, match=f"beside this Python \\({tmp_path}/flwr\\) "
                                                "nor on PATH"):
        submit.flwr_cli()


def test_the_submit_tool_runs_with_the_venv_interpreter_and_no_venv_on_path(tmp_path):
    # what failed with FileNotFoundError: 'flwr' before: `flwr ls` through the tool's own
    # helper, from a shell whose PATH has no venv
    code = ("from fedapp.tools.submit import flwr\n"
            "out = flwr('--version')\n"
            "print(out.returncode, out.stdout.strip())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                          timeout=120, check=False)

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("0 ") and "1.41" in proc.stdout


def test_a_dropped_log_stream_waits_for_the_run_and_gives_up_only_when_unreachable(
        monkeypatch, capsys):
    answers = iter(["running", "running", "unknown", "running", "finished:completed"])
    monkeypatch.setattr(submit, "run_status", lambda run_id, superlink: next(answers))
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    assert submit.wait_until_finished("7", "x", unreachable_for=60) == "finished:completed"
    assert "run 7 is running, waiting for it to finish" in capsys.readouterr().out

    clock = iter(range(0, 1000, 40))  # 40 s between polls: the second unknown gives up
    monkeypatch.setattr(submit, "run_status", lambda run_id, superlink: "unknown")
    monkeypatch.setattr(submit.time, "monotonic", lambda: next(clock))
    assert submit.wait_until_finished("7", "x", unreachable_for=60) == "unknown"


def test_a_relative_run_dir_is_the_folder_the_caller_named(monkeypatch, tmp_path):
    # the subprocess starts in run_dir's parent: bench_fedspine --out runs/x once wrote its
    # runs to runs/x/runs/x/... and then found no metrics where it looked
    seen = {}

    def fake_run(args, cwd, **_kwargs):
        seen["run-dir"] = Path(cwd) / args[args.index("--run-dir") + 1]
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(submit.subprocess, "run", fake_run)
    submit.run_submit(ROOT, 2, "", Path("runs") / "bench" / "one", env={})

    assert seen["run-dir"] == tmp_path / "runs" / "bench" / "one"
