#!/usr/bin/env bash
# `accelerate launch` with launch/accelerate.yaml; run this same command on every node.
#
#   launch/accelerate.sh CONFIG [key=value ...]                       # one node: every GPU
#   NPROC_PER_NODE=2 launch/accelerate.sh CONFIG ...                  # 2 processes (on CPU too: gloo)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/accelerate.sh ...   # on node0; NODE_RANK=1 on the other
#
# Same variables as launch/torchrun.sh: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1;
# required with NNODES > 1), MASTER_PORT (29500), NPROC_PER_NODE (visible GPUs, else 1).
# LAUNCH_ARGS: more `accelerate launch` flags. On CPU do not pass --cpu: accelerate then
# starts one process (its multi-CPU mode needs mpirun); the yaml's multi-GPU mode runs
# torch.distributed, and vlp picks gloo when there is no GPU.
# VLP_ENTRY ("vlp train"): the module and arguments each process runs with python -m.
set -euo pipefail
if [ "${NNODES:-1}" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "launch/accelerate.sh: set MASTER_ADDR to an address of node 0 (NNODES=$NNODES)" >&2; exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
NNODES=${NNODES:-1}
# shellcheck disable=SC2086  # LAUNCH_ARGS are flags; VLP_ENTRY is a module plus its arguments
exec accelerate launch --config_file "$(dirname "$0")/accelerate.yaml" \
    --num_machines "$NNODES" --machine_rank "${NODE_RANK:-0}" --num_processes $((NNODES * NPROC_PER_NODE)) \
    --main_process_ip "${MASTER_ADDR:-127.0.0.1}" --main_process_port "${MASTER_PORT:-29500}" \
    ${LAUNCH_ARGS:-} -m ${VLP_ENTRY:-vlp train} "$@"
