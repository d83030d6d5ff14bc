#!/usr/bin/env bash
# Start one Flower SuperNode (one client) of a real deployment, in the foreground; it execs
# flower-supernode, so its pid is this script's pid.
#
#   scripts/deploy/supernode.sh --superlink flower.example.org:8000 --ca certs/ca.crt \
#       --key keys/supernode-0 --partition-id 0 --num-partitions 2 [--port 9094]
#   scripts/deploy/supernode.sh --superlink 127.0.0.1:8000 --insecure \
#       --partition-id 0 --num-partitions 2 --port 9094            # quick local try
#
# --port is the SuperNode's own runtime API, bound to 127.0.0.1 (nothing to open in a
# firewall); SuperNodes sharing a host need distinct ports. The client reads its data
# partition from --partition-id/--num-partitions. Extra arguments go to flower-supernode.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../flwr_env.sh"

superlink="" ca="" key="" insecure=0 partition="" partitions="" port=9094
extra=()
while (($#)); do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --partition-id) partition="$2"; shift 2 ;;
    --num-partitions) partitions="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [[ -z "$superlink" || -z "$partition" || -z "$partitions" ]]; then
  echo "supernode.sh: --superlink host:port, --partition-id and --num-partitions are needed" >&2
  exit 2
fi

if ((insecure)); then
  security=(--insecure)
elif [[ -n "$ca" && -n "$key" ]]; then
  security=(--root-certificates "$(realpath "$ca")" --auth-supernode-private-key "$(realpath "$key")")
else
  echo "supernode.sh: give --ca <ca.crt> and --key <private key>, or --insecure" >&2
  exit 2
fi

# A neutral working directory: ClientApps must import the submitted app, not a checkout.
mkdir -p "$FLWR_HOME"
cd "$FLWR_HOME"
exec flower-supernode "${security[@]}" --superlink "$superlink" --host 127.0.0.1 \
  --port "$port" --node-config "partition-id=$partition num-partitions=$partitions" \
  "${extra[@]}"
