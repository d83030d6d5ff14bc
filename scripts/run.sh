#!/usr/bin/env bash
# The default federated run: SmolLM2-135M in 4-bit on 4 simulated clients, FLoRA with
# heterogeneous ranks, 3 rounds. Sets up .venv first if needed.
#
#   scripts/run.sh                                  # the default run
#   scripts/run.sh "strategy=fedit num_rounds=5"    # any Hydra overrides (see README)
#   NUM_CLIENTS=8 scripts/run.sh "scenario.num_clients=8"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/flwr_env.sh"

overrides="${1:-}"
num_clients="${NUM_CLIENTS:-4}"
run_dir="${RUN_DIR:-$root/runs/$(date +%Y%m%d-%H%M%S)}"
echo "[run] $num_clients simulated clients; overrides: '${overrides}'; results: $run_dir"
exec "$root/.venv/bin/python" -m fedapp.tools.submit --app "$root" \
  --num-supernodes "$num_clients" --overrides "$overrides" --run-dir "$run_dir"
