#!/usr/bin/env bash
# Training on a Cloud TPU VM, one host or a multi-host slice: copies this repository to every
# host, installs it with JAX for TPU, and starts the same command on all of them (one process
# per host, over its local chips).
#
#   TPU_NAME=my-tpu ZONE=us-east5-a launch/tpu_vm.sh --config=configs/pretrain_0.3b.py --workdir=/mnt/runs/0.3b
#
# Create the TPU VM first (`gcloud compute tpus tpu-vm create`). Arguments go to
# `python -m sapiens_jax.main`. The workdir must be a directory every host sees (e.g. a Filestore
# or gcsfuse mount): each host writes its shards of every checkpoint there. Worker 0's internal
# IP is passed as --coordinator_address; JAX reads the number of hosts and this host's index from
# the TPU metadata. Output of all hosts streams here; stopping this script stops the run.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
cd "$(dirname "$0")/.."

coordinator=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
  --format='value(networkEndpoints[0].ipAddress)')
tar czf /tmp/sapiens_jax.tgz --exclude=__pycache__ setup.py sapiens_jax configs
gcloud compute tpus tpu-vm scp /tmp/sapiens_jax.tgz "$TPU_NAME":~/ --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  mkdir -p ~/sapiens_jax && tar xzf ~/sapiens_jax.tgz -C ~/sapiens_jax && cd ~/sapiens_jax
  python3 -m pip install --quiet -e '.[tpu]'
  python3 -m sapiens_jax.main $(printf '%q ' "$@") --coordinator_address=$coordinator:8482"
