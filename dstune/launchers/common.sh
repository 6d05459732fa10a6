# Sourced by the launch scripts.
# run CMD...: exec CMD, or print it shell-quoted when DRY_RUN is set (`dstune launch --dry-run` uses this).
run() {
  if [[ -n ${DRY_RUN:-} ]]; then printf '%q ' "$@"; echo; else exec "$@"; fi
}
# one process per GPU on this node, 1 on a machine without GPUs, unless PROCS_PER_NODE says otherwise
if [[ -z ${PROCS_PER_NODE:-} ]]; then
  PROCS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ ${PROCS_PER_NODE:-0} -gt 0 ]] || PROCS_PER_NODE=1
fi
