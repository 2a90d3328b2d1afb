#!/usr/bin/env bash
# Launch training with torchrun, on one node or several.
#
#   launch/torchrun.sh CONFIG [a.b=value ...] [--resume]
#
# Environment: NPROC_PER_NODE (default: GPUs on this node, else 2 CPU processes),
# NNODES (default 1), NODE_RANK (default 0), MASTER_ADDR (default 127.0.0.1),
# MASTER_PORT (default 29500). On CPU the ranks talk over gloo.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$repo/launch/common.sh"
require_config $# "$0 CONFIG [a.b=value ...] [--resume]"
exec "${python[@]}" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$(processes_per_node 2)" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m mmcontrast.cli train "$@"
