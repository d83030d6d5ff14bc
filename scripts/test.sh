#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (tiny models; the slow tests start real
# Flower SuperLinks on 127.0.0.1). Extra arguments go to pytest, e.g. `-m "not slow"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/flwr_env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"
