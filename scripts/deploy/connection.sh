#!/usr/bin/env bash
# Tell the `flwr` CLI (in $FLWR_HOME/config.toml) where the SuperLink is.
#
#   scripts/deploy/connection.sh fedlink flower.example.org:8000 certs/ca.crt
#   scripts/deploy/connection.sh fedlink-local 127.0.0.1:8000 --insecure
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../flwr_env.sh"
if (($# != 3)); then
  echo "usage: connection.sh <name> <host:port> <ca.crt | --insecure>" >&2
  exit 2
fi
if [[ "$3" == --insecure ]]; then security=(--insecure); else security=(--root-certificates "$3"); fi
python -m fedapp.tools.deploy connection --name "$1" --address "$2" "${security[@]}" \
  --flwr-home "$FLWR_HOME"
