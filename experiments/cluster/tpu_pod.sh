#!/bin/bash
# Multi-host tlflax training on a Cloud TPU VM pod slice (e.g. v5litepod-16: 4 hosts).
#
#   TPU=my-pod ZONE=us-west4-a WORKDIR=/mnt/shared/runs/det \
#       experiments/cluster/tpu_pod.sh --config configs/pets_detection.py
#
# Runs the same command on every worker at once. TPU VM workers find each
# other through the TPU metadata server, not environment variables, so the
# command says --config.distributed.mode=on and jax.distributed.initialize()
# detects the rest. The repository and its .venv must be at $REPO on every
# worker, and WORKDIR on a file system all workers share (e.g. a Filestore NFS
# mount): checkpoints are written by all processes, logs by process 0.
set -euo pipefail
: "${TPU:?set TPU to the pod slice name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (shared)}"
REPO=${REPO:-tlflax}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="cd $REPO && \
  .venv/bin/python -m tlflax.main $* --workdir $WORKDIR --config.distributed.mode=on"
