#!/usr/bin/env bash
# A multi-process run on this machine, each process with its own CPU devices: exercises the
# multi-host code paths (per-process data, global arrays, chief-only logging, sharded
# checkpoints) without a cluster.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS -- ARGS...
#   launch/local.sh 2 4 -- --config=configs/quickstart.py --workdir=/tmp/sapiens_2proc
#
# ARGS go to `python -m sapiens_jax.main` (the `python` on PATH, run from the repository root).
# Output of process i is prefixed with "[process i]". Exits non-zero if any process fails, and
# then stops the others rather than leaving them waiting for it.
set -euo pipefail

if [[ $# -lt 3 || $3 != "--" ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
num_processes=$1
devices_per_process=$2
shift 3
cd "$(dirname "$0")/.."

# The coordinator's port. Picking a free port and letting it go would race: XLA's coordinator (gRPC)
# binds with SO_REUSEPORT, so a second run that picked the same port binds it too, without an
# error, and the two runs' processes then join each other. So a helper keeps the port bound (also
# with SO_REUSEPORT, never listening) until this script exits: no other pick or connection gets it
# meanwhile, and process 0's coordinator, the same user's, shares it and is the one that listens.
coproc reservation { python -c 'import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("::", 0))
print(s.getsockname()[1], flush=True)
sys.stdin.read()  # until the script exits'; }
read -r port <&"${reservation[0]}"
declare -A running  # pid -> process index
trap 'kill "${!running[@]}" "$reservation_PID" 2>/dev/null; exit 143' INT TERM
for ((i = 0; i < num_processes; i++)); do
  # The concurrency-optimised CPU scheduler can start collectives in different orders on different
  # device threads and deadlock (tests/fake_devices.py).
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices_per_process \
--xla_cpu_enable_concurrency_optimized_scheduler=false" \
    python -m sapiens_jax.main "$@" --coordinator_address="localhost:$port" \
      --num_processes="$num_processes" --process_id="$i" > >(sed -u "s/^/[process $i] /") 2>&1 &
  running[$!]=$i
done

status=0
while ((${#running[@]})); do
  code=0
  wait -n -p finished "${!running[@]}" || code=$?
  i=${running[$finished]}
  unset "running[$finished]"
  if ((code && !status)); then
    echo "[launch/local.sh] process $i exited with status $code; stopping the others" >&2
    kill "${!running[@]}" 2>/dev/null || true
    status=1
  fi
done
exit $status
