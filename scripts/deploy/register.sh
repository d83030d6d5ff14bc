#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink started with --enable-supernode-auth.
# Run it where the `flwr` connection was written (scripts/deploy/connection.sh).
#
#   scripts/deploy/register.sh fedlink keys/supernode-0.pub keys/supernode-1.pub
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../flwr_env.sh"
if (($# < 2)); then
  echo "usage: register.sh <connection> <public key>..." >&2
  exit 2
fi
connection="$1"; shift
for key in "$@"; do
  flwr supernode register "$key" "$connection"
done
