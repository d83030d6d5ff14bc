#!/usr/bin/env bash
# Start the Flower SuperLink of a real deployment (runs in the foreground; its pid is this
# script's pid, since it execs flower-superlink).
#
#   scripts/deploy/superlink.sh --certs certs [--host 0.0.0.0] [--port 8000] [--database FILE]
#   scripts/deploy/superlink.sh --insecure --host 127.0.0.1     # quick local try, no TLS
#
# With --certs (from `scripts/deploy/credentials.py tls --out certs --host <server name>`)
# it serves TLS and only accepts SuperNodes whose public keys were registered with
# scripts/deploy/register.sh. One port serves SuperNodes (Fleet API), the `flwr` CLI
# (Control API) and the ServerApp runtime: open it to the clients. Extra arguments go to
# flower-superlink unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../flwr_env.sh"

certs="" insecure=0 host=0.0.0.0 port=8000 database=""
extra=()
while (($#)); do
  case "$1" in
    --certs) certs="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --database) database="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
mkdir -p "$FLWR_HOME"
database="${database:-$FLWR_HOME/superlink.db}"

if ((insecure)); then
  security=(--insecure)
elif [[ -n "$certs" ]]; then
  certs="$(cd "$certs" && pwd)"
  security=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/superlink.crt"
            --ssl-keyfile "$certs/superlink.key" --enable-supernode-auth)
else
  echo "superlink.sh: give --certs <dir> (TLS + SuperNode authentication) or --insecure" >&2
  exit 2
fi

# A neutral working directory: the ServerApp must import the submitted app, not a checkout.
cd "$FLWR_HOME"
exec flower-superlink "${security[@]}" --host "$host" --port "$port" \
  --database "$database" "${extra[@]}"
