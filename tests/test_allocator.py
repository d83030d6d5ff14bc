"""The allocator the app's processes start with (`fedapp.tools.allocator`) and what a process
on it sees (`fedapp.llm.memory.allocator`, `return_freed_memory`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedapp.tools.allocator import VARIABLE, allocator_env, jemalloc_library
from fedapp.tools.submit import flower_env

JEMALLOC = jemalloc_library()
needs_jemalloc = pytest.mark.skipif(
    JEMALLOC is None or not sys.platform.startswith("linux"), reason="no jemalloc here")

PROBE = """
import ctypes, json
from fedapp.llm import memory
name = memory.allocator()
released = memory.return_freed_memory()
decay = None
if name == "jemalloc":
    value, size = ctypes.c_ssize_t(-2), ctypes.c_size_t(8)
    ctypes.CDLL(None).mallctl(b"arena.0.dirty_decay_ms", ctypes.byref(value),
                              ctypes.byref(size), None, 0)
    decay = value.value
print(json.dumps({"allocator": name, "released": released, "decay": decay}))
"""


def probe(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def base_env(monkeypatch, **values: str) -> dict[str, str]:
    """os.environ without the variables under test, plus `values`."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(VARIABLE, raising=False)
    return {**os.environ, **values}


@needs_jemalloc
def test_by_default_jemalloc_goes_first_and_once(monkeypatch):
    env = allocator_env(base_env(monkeypatch, LD_PRELOAD="/opt/other.so"))
    assert env["LD_PRELOAD"] == f"{JEMALLOC}:/opt/other.so"
    assert env[VARIABLE] == str(JEMALLOC)
    assert allocator_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # applied twice: once


@needs_jemalloc
def test_system_takes_out_a_jemalloc_preloaded_upstream_and_keeps_the_rest(monkeypatch):
    upstream = allocator_env(base_env(monkeypatch, LD_PRELOAD="/opt/other.so"))
    env = allocator_env({**upstream, VARIABLE: "system"})
    assert env["LD_PRELOAD"] == "/opt/other.so" and env[VARIABLE] == "system"
    alone = allocator_env({**allocator_env(base_env(monkeypatch)), VARIABLE: "system"})
    assert "LD_PRELOAD" not in alone


def test_a_bad_choice_names_what_is_allowed(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"FEDAPP_ALLOCATOR='tcmalloc'.*'jemalloc', 'system'"):
        allocator_env(base_env(monkeypatch, FEDAPP_ALLOCATOR="tcmalloc"))
    with pytest.raises(ValueError, match="existing malloc library"):
        allocator_env(base_env(monkeypatch, FEDAPP_ALLOCATOR=str(tmp_path / "missing.so")))


@needs_jemalloc
def test_a_process_started_from_it_runs_on_jemalloc_and_can_give_memory_back(monkeypatch):
    seen = probe(allocator_env(base_env(monkeypatch)))
    assert seen == {"allocator": "jemalloc", "released": True, "decay": 0}  # default 10000


def test_on_system_a_process_runs_on_glibc(monkeypatch):
    seen = probe(allocator_env(base_env(monkeypatch, FEDAPP_ALLOCATOR="system")))
    assert seen["allocator"] == "system" and seen["decay"] is None


@needs_jemalloc
def test_flower_processes_start_on_it(monkeypatch, tmp_path):
    env = flower_env(tmp_path / "home")
    assert str(JEMALLOC) in env["LD_PRELOAD"].split(":")
    monkeypatch.setenv(VARIABLE, "system")
    assert "jemalloc" not in flower_env(tmp_path / "home").get("LD_PRELOAD", "")


def test_the_shell_line_exports_the_choice(monkeypatch):
    env = base_env(monkeypatch, FEDAPP_ALLOCATOR="system")
    out = subprocess.run([sys.executable, "-m", "fedapp.tools.allocator", "--shell"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "export FEDAPP_ALLOCATOR=system"
    bad = subprocess.run([sys.executable, "-m", "fedapp.tools.allocator", "--shell"],
                         env={**env, VARIABLE: "nope"}, capture_output=True, text=True,
                         check=False)
    assert bad.returncode != 0 and "allowed" in bad.stderr and bad.stdout == ""
