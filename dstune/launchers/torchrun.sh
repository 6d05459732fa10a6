#!/usr/bin/env bash
# dstune under torchrun with a static rendezvous; run it on every node.
#
#   one node, 8 GPUs:  PROCS_PER_NODE=8 launch/torchrun.sh RECIPE [key=value ...]
#   N nodes:           NNODES=N NODE_RANK=r MASTER_ADDR=node1 launch/torchrun.sh RECIPE [key=value ...]
#                      (r = 0..N-1; node 0 hosts the rendezvous at MASTER_ADDR:MASTER_PORT, default 29500)
#
# RDZV_TIMEOUT (seconds, default 600) bounds the wait for all nodes to join.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$PROCS_PER_NODE" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --rdzv_conf "timeout=${RDZV_TIMEOUT:-600}" -m dstune train "$@"
