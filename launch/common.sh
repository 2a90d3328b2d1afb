# Sourced by the launch scripts once `repo` names the checkout: the usage check, the Python
# command, DeepSpeed's op cache, and the default number of processes per node.
# shellcheck shell=bash disable=SC2034,SC2154  # sets `python` for the caller, reads its `repo`

# PYTHON: a command, words allowed (e.g. "apptainer exec --nv img.sif python3"); default: the
# checkout's .venv, else python3.
if [ -n "${PYTHON:-}" ]; then
  read -r -a python <<<"$PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then
  python=("$repo/.venv/bin/python")
else
  python=(python3)
fi
# DeepSpeed JIT-builds a communication op on first start; keep it between runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"

# NPROC_PER_NODE, else this node's GPU count, else $1 (CPU processes).
processes_per_node() {
  if [ -n "${NPROC_PER_NODE:-}" ]; then
    echo "$NPROC_PER_NODE"
    return
  fi
  local gpus
  gpus=$("${python[@]}" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$gpus" -gt 0 ]; then echo "$gpus"; else echo "$1"; fi
}

# require_config ARGC USAGE: exit 2 with the usage line when no CONFIG argument was given.
require_config() {
  if [ "$1" -lt 1 ]; then
    echo "usage: $2" >&2
    exit 2
  fi
}
