#!/usr/bin/env bash
# torchrun: NPROC_PER_NODE processes on each of NNODES nodes; run this same command on every node.
#
#   launch/torchrun.sh CONFIG [key=value ...]                       # one node: every GPU (1 process on CPU)
#   NPROC_PER_NODE=2 launch/torchrun.sh CONFIG [key=value ...]      # 2 processes (e.g. on CPU: gloo)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh ...   # on node0; NODE_RANK=1 on the other
#
# NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1; an address of node 0 that every node
# reaches; required with NNODES > 1), MASTER_PORT (29500), NPROC_PER_NODE (visible GPUs,
# else 1). LAUNCH_ARGS: more torchrun flags (e.g. "--max_restarts 3").
# VLP_ENTRY ("vlp train"): the module and arguments each process runs with python -m.
set -euo pipefail
if [ "${NNODES:-1}" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "launch/torchrun.sh: set MASTER_ADDR to an address of node 0 (NNODES=$NNODES)" >&2; exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
# shellcheck disable=SC2086  # LAUNCH_ARGS are flags; VLP_ENTRY is a module plus its arguments
exec torchrun \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    ${LAUNCH_ARGS:-} -m ${VLP_ENTRY:-vlp train} "$@"
