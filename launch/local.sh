#!/usr/bin/env bash
# Runs the train binary as NPROC processes on this machine, each with DEVICES_PER_PROC
# devices, joined by jax.distributed (gloo collectives on CPU): the code path of a TPU pod
# or a multi-GPU cluster.
#
#   launch/local.sh NPROC DEVICES_PER_PROC -- --config configs/demo.py --workdir /tmp/run
#
# On CPU each process gets DEVICES_PER_PROC fake devices; on a GPU host each process gets
# DEVICES_PER_PROC GPUs (CUDA_VISIBLE_DEVICES). Process 0 prints to the console; the others
# log to ${CLIP_JAX_LOG_DIR:-/tmp}/clip_jax_proc_N.log. Exits non-zero if any process fails.
#
# Python: $PYTHON when set, else this checkout's .venv/bin/python when it exists (the
# Quickstart's venv), else python3 from PATH. On GPUs each process also gets
# launch/gpu_host.sh's XLA and NCCL settings. launch/gpu_host.sh sources this file for
# `find_python`.

# The Python to run: $PYTHON, else REPO/.venv/bin/python when it exists, else python3.
find_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x "$1/.venv/bin/python" ]]; then
    echo "$1/.venv/bin/python"
  else
    echo python3
  fi
}

usage() { echo "usage: $0 NPROC DEVICES_PER_PROC -- TRAIN_ARGS..." >&2; exit 2; }

main() {
  set -euo pipefail
  [[ $# -ge 3 && "$3" == "--" ]] || usage
  nproc="$1"; devices="$2"; shift 3
  [[ "$nproc" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || usage

  port="${CLIP_JAX_PORT:-$((20000 + RANDOM % 20000))}"
  log_dir="${CLIP_JAX_LOG_DIR:-/tmp}"
  mkdir -p "$log_dir"
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  python="$(find_python "$repo")"
  platform="${JAX_PLATFORMS:-cpu}"
  if [[ "$platform" != "cpu" ]]; then
    # shellcheck source=SCRIPTDIR/gpu_host.sh disable=SC1091
    source "${repo}/launch/gpu_host.sh"
    gpu_env
  fi
  pids=()

  # shellcheck disable=SC2329  # invoked by the trap below
  cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
  trap cleanup INT TERM

  for ((i = 0; i < nproc; i++)); do
    env_vars=(CLIP_JAX_COORDINATOR="127.0.0.1:${port}" CLIP_JAX_NUM_PROCESSES="$nproc"
              CLIP_JAX_PROCESS_ID="$i" JAX_PLATFORMS="$platform")
    if [[ "$platform" == "cpu" ]]; then
      env_vars+=(JAX_NUM_CPU_DEVICES="$devices" JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)
    else
      first=$((i * devices))
      env_vars+=(CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $((first + devices - 1)))")
    fi
    if [[ $i -eq 0 ]]; then
      env "${env_vars[@]}" "$python" -m clip_jax.train "$@" &
    else
      env "${env_vars[@]}" "$python" -m clip_jax.train "$@" > "${log_dir}/clip_jax_proc_${i}.log" 2>&1 &
    fi
    pids+=($!)
  done

  status=0
  for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
  done
  exit "$status"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
