#!/usr/bin/env bash
# Launch training with DeepSpeed's launcher, on this node or on the hosts of a hostfile.
#
#   launch/deepspeed.sh CONFIG [a.b=value ...] [--resume]
#
# Environment: HOSTFILE (lines "hostname slots=N"; several hosts are reached over pdsh/ssh,
# as DeepSpeed does), NPROC_PER_NODE (without HOSTFILE; default: GPUs here, else 2 CPU
# processes), MASTER_ADDR (default: the first host), MASTER_PORT (default 29500),
# PYTHON (see launch/common.sh). On CPU the ranks talk over gloo.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$repo/launch/common.sh"
require_config $# "$0 CONFIG [a.b=value ...] [--resume]"
# one intra-op thread per rank unless told otherwise, as torchrun does: runs resumed under
# either launcher then compute exactly the same numbers
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

launcher=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    echo "$0: HOSTFILE $HOSTFILE does not exist" >&2
    exit 2
  fi
  launcher+=(--hostfile "$HOSTFILE")
  hosts=$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE" || true)
  if [ "$hosts" -le 1 ]; then
    # one host: DeepSpeed launches locally, without its ssh reachability check
    launcher+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
  elif [ -n "${MASTER_ADDR:-}" ]; then
    launcher+=(--master_addr "$MASTER_ADDR")
  fi
else
  launcher+=(--num_gpus "$(processes_per_node 2)")  # on CPU: this many processes
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment, as under torchrun
"${python[@]}" -m deepspeed.launcher.runner "${launcher[@]}" --no_local_rank \
  --module mmcontrast.cli train "$@"
