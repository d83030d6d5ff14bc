# Sourced by the scripts: a private Flower home and the settings these machines need.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FLWR_HOME="${FLWR_HOME:-$root/.flwr-home}"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
# Without this the SuperLink runs `uv sync` of the app's dependencies per run (CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
# Ray's coming default (accelerator variables of GPU-less actors left alone), said explicitly:
# otherwise every simulation prints a FutureWarning that it will change.
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export PATH="$root/.venv/bin:$PATH"
# Processes started from here run on jemalloc where one is installed (less fragmentation, a
# lower peak; fedapp/tools/allocator.py). FEDAPP_ALLOCATOR=system keeps glibc's malloc.
if [ -x "$root/.venv/bin/python" ]; then
  if ! allocator_line="$(cd "$root" && "$root/.venv/bin/python" -m fedapp.tools.allocator --shell)"; then
    return 1
  fi
  eval "$allocator_line"
fi
