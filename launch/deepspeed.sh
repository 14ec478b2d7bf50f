#!/usr/bin/env bash
# DeepSpeed's launcher (`deepspeed`): one process per slot of each host in HOSTFILE.
#
#   NPROC_PER_NODE=2 launch/deepspeed.sh CONFIG [key=value ...]        # one node, 2 processes (GPUs or CPU)
#   HOSTFILE=launch/hostfile launch/deepspeed.sh CONFIG ...            # from node 0: pdsh + passwordless ssh
#   HOSTFILE=launch/hostfile NODE_RANK=0 MASTER_ADDR=node0 launch/deepspeed.sh CONFIG ...
#                                   # no ssh: run on every node, NODE_RANK = its line in HOSTFILE
#
# HOSTFILE: "host slots=N" lines (see launch/hostfile.example); unset = this node only, with
# NPROC_PER_NODE processes (default: every visible GPU). MASTER_ADDR (a hostfile run asks
# the first host for it over ssh), MASTER_PORT (29500). LAUNCH_ARGS: more `deepspeed` flags.
# VLP_ENTRY ("vlp train"): the module and arguments each process runs with python -m.
# --no_local_rank: vlp reads LOCAL_RANK from the environment, not a --local_rank argument.
set -euo pipefail
if [ -n "${NODE_RANK:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "launch/deepspeed.sh: NODE_RANK needs MASTER_ADDR (an address of the first host)" >&2; exit 2
fi
args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${NPROC_PER_NODE:-}" ] && args+=(--num_gpus "$NPROC_PER_NODE")
[ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
[ -n "${NODE_RANK:-}" ] && args+=(--no_ssh --node_rank "$NODE_RANK")
# shellcheck disable=SC2086  # LAUNCH_ARGS are flags; VLP_ENTRY is a module plus its arguments
exec deepspeed "${args[@]}" ${LAUNCH_ARGS:-} --module ${VLP_ENTRY:-vlp train} "$@"
