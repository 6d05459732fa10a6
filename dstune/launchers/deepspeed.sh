#!/usr/bin/env bash
# dstune under DeepSpeed's launcher.
#
#   one node, 8 GPUs:      PROCS_PER_NODE=8 launch/deepspeed.sh RECIPE [key=value ...]
#   N nodes over ssh:      HOSTFILE=hostfile MASTER_ADDR=node1 launch/deepspeed.sh RECIPE [key=value ...]
#                          (once, on any node; pdsh starts one launcher per host over passwordless ssh)
#   N nodes without ssh:   HOSTFILE=hostfile NO_SSH=1 NODE_RANK=r MASTER_ADDR=node1 launch/deepspeed.sh RECIPE ...
#                          (on every node, r = its line in the hostfile counting from 0)
#
# The hostfile holds one "HOST slots=GPUS" line per node. Over ssh, the remote ranks get only the
# variables DeepSpeed forwards plus KEY=VALUE lines of the file named by DS_ENV_FILE (`dstune launch`
# writes one). MASTER_PORT defaults to 29500.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

args=(--master_port "${MASTER_PORT:-29500}")
if [[ -z ${HOSTFILE:-} ]]; then
  args+=(--num_gpus "$PROCS_PER_NODE")
else
  args+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}")
  if [[ -n ${NO_SSH:-} ]]; then
    args+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK to the line of this node in the hostfile, from 0}")
  else
    args+=(--launcher pdsh)
  fi
fi
run deepspeed "${args[@]}" --module dstune train "$@"
