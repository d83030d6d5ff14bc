"""The layout's rules, checked: `strategies` is a library that never needs the app or the
model stack; files and functions stay small; no module reaches into another's privates."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedapp", "strategies")
FORBIDDEN = ("fedapp", "transformers", "peft", "datasets", "hydra", "omegaconf", "bitsandbytes")
ALLOWED_IN_STRATEGIES = {"flwr", "torch", "numpy", "strategies"} | set(sys.stdlib_module_names)
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60

# Imports `strategies` and every submodule in a fresh interpreter, then prints (as JSON) the
# submodules found and every loaded module whose top-level name is forbidden.
PROBE = """
import importlib, json, pkgutil, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
import strategies
found = [m.name for m in pkgutil.walk_packages(strategies.__path__, "strategies.")]
for name in found:
    importlib.import_module(name)
forbidden = set(sys.argv[1].split(","))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({"submodules": found, "forbidden": loaded}))
"""


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def probe_strategies_imports(*extra: str) -> dict:
    """What importing all of `strategies` (after `extra` modules) loads, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", PROBE, ",".join(FORBIDDEN), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# strategies is a library


def test_importing_strategies_loads_neither_the_app_nor_the_model_stack():
    # Execute
    result = probe_strategies_imports()

    # Assert
    expected = {f"strategies.{p.stem}" for p in (ROOT / "strategies").glob("*.py")
                if p.stem != "__init__"}
    assert expected <= set(result["submodules"])
    assert result["forbidden"] == []


def test_the_import_probe_sees_a_forbidden_import():
    # Execute: as if a strategies module imported omegaconf
    result = probe_strategies_imports("omegaconf")

    # Assert
    assert "omegaconf" in result["forbidden"]


def test_the_message_contract_loads_no_torch():
    # Execute: what a tool reading the protocol alone pays for it
    done = subprocess.run([sys.executable, "-c", ("import sys, strategies.protocol, strategies.global_version; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                           "('torch', 'fedapp', 'transformers')))")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)

    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def imported_top_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import; relative ones stay in-package."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module.split(".")[0]))
    return names


def test_strategies_import_only_flwr_torch_numpy_and_the_standard_library():
    # Execute
    offenders = [f"{rel(path)}:{line} imports {name}"
                 for path in python_files("strategies")
                 for line, name in imported_top_names(ast.parse(path.read_text()))
                 if name not in ALLOWED_IN_STRATEGIES]

    # Assert
    assert offenders == []


def test_the_import_scan_sees_a_forbidden_import():
    # Prepare
    tree = ast.parse("import os\nfrom torch import nn\nimport transformers.models\n"
                     "from fedapp.config import run_setup\nfrom . import base\n")

    # Execute
    names = imported_top_names(tree)

    # Assert
    assert names == [(1, "os"), (2, "torch"), (3, "transformers"), (4, "fedapp")]
    assert [n for _, n in names if n not in ALLOWED_IN_STRATEGIES] == ["transformers", "fedapp"]


# ---------------------------------------------------------------------------------------
# Small files, short functions


def test_no_python_file_is_over_400_lines():
    # Execute
    long_files = {rel(p): n for p in python_files(*PACKAGES, "tests")
                  if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}

    # Assert
    assert long_files == {}


def long_functions(tree: ast.AST) -> list[tuple[str, int]]:
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_over_60_lines():
    # Execute
    offenders = [f"{rel(path)}: {name}() has {length} lines"
                 for path in python_files(*PACKAGES)
                 for name, length in long_functions(ast.parse(path.read_text()))]

    # Assert
    assert offenders == []


def test_the_function_length_scan_counts_decorators_out_and_nested_functions_in():
    # Prepare: a 62-line function (def + 61 body lines) holding a 2-line one
    body = "".join(f"    x{i} = {i}\n" for i in range(58))
    source = f"@cache\ndef outer():\n    def inner():\n        return 1\n{body}    return inner\n"

    # Execute
    found = long_functions(ast.parse(source))

    # Assert
    assert found == [("outer", 62)]


# ---------------------------------------------------------------------------------------
# Privates stay private


def private_imports(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `from <project module> import _name`."""
    return [(node.lineno, node.module, a.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            and node.module.split(".")[0] in PACKAGES
            for a in node.names if a.name.startswith("_")]


@pytest.mark.parametrize("folder", [*PACKAGES, "tests"])
def test_no_module_imports_a_private_name_of_another(folder):
    # Execute
    offenders = [f"{rel(path)}:{line} from {module} import {name}"
                 for path in python_files(folder)
                 for line, module, name in private_imports(ast.parse(path.read_text()))]

    # Assert
    assert offenders == []


def test_the_private_import_scan_sees_one():
    # Prepare
    tree = ast.parse("from fedapp.client.pruned import _COPIES, take_copy\n"
                     "from strategies.protocol import _Record\nfrom os import _exit\n"
                     "from __future__ import annotations\n")

    # Execute / Assert
    assert private_imports(tree) == [(1, "fedapp.client.pruned", "_COPIES"),
                                     (2, "strategies.protocol", "_Record")]
