#!/usr/bin/env bash
# One train process driving every GPU of this host (JAX's single-process multi-GPU model:
# the mesh spans all local GPUs, no jax.distributed), with the XLA and NCCL settings below.
#
#   launch/gpu_host.sh --config configs/clip.py:model=ViT-B-16,gpus=8 --workdir /runs/b16 \
#       --config.data.train='/data/laion/{00000..41455}.tar'
#
# XLA_FLAGS you set are kept: each flag below is added only when your XLA_FLAGS does not
# set it already, so yours win. NCCL_* and XLA_PYTHON_CLIENT_MEM_FRACTION: a value in the
# environment wins over the default here, as does JAX_PLATFORMS (default cuda). GPUs: all that CUDA_VISIBLE_DEVICES
# shows (all of them when unset). Python: as launch/local.sh ($PYTHON, else this
# checkout's .venv/bin/python, else python3). DRY_RUN=1 prints the settings and the command
# instead of running it. launch/slurm.sbatch and launch/local.sh (on GPUs) source this file
# for `gpu_env`.

# XLA options, from JAX's GPU performance tips (docs.jax.dev/en/latest/gpu_performance_tips.html)
# and NVIDIA's JAX-Toolbox GPU performance guide; names checked against jaxlib 0.10.2.
GPU_XLA_FLAGS=(
  # Schedules the gradient all-reduce (FSDP: all-gathers, reduce-scatters) to run while the
  # backward pass computes, instead of after it.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # CUDA graphs (command buffers) for fusions, cuBLAS matmuls and custom calls (cuDNN
  # attention): an unrolled step launches thousands of kernels; one graph launch replaces
  # their per-kernel host overhead.
  "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
  # Collectives combined up to 128 MiB: at least one layer of every shipped model (ViT-L-14
  # 50 MB, SO400M 61 MB of float32 weights), so NCCL moves few large buffers at full link
  # bandwidth, yet far below a whole gradient (0.6-3.5 GB), so the all-reduce still
  # overlaps the backward pass layer by layer.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
)

# Exports XLA_FLAGS (the user's plus each of GPU_XLA_FLAGS it does not set) and the NCCL
# and memory defaults.
gpu_env() {
  local flag flags="${XLA_FLAGS:-}"
  for flag in "${GPU_XLA_FLAGS[@]}"; do
    [[ " ${flags} " =~ [[:space:]]${flag%%=*}(=|[[:space:]]) ]] || flags="${flags:+${flags} }${flag}"
  done
  export XLA_FLAGS="${flags}"
  # NCCL, from JAX's GPU performance tips: all three protocols, with NCCL's larger LL and
  # LL128 buffers (-2), speed up collectives between the GPUs of a host.
  export NCCL_PROTO="${NCCL_PROTO:-SIMPLE,LL,LL128}"
  export NCCL_LL_BUFFSIZE="${NCCL_LL_BUFFSIZE:--2}"
  export NCCL_LL128_BUFFSIZE="${NCCL_LL128_BUFFSIZE:--2}"
  # One process drives several GPUs: NCCL launches their kernels as one group, which avoids
  # the hang JAX-Toolbox reports when a process-wide CUDA call meets a running collective.
  export NCCL_LAUNCH_MODE="${NCCL_LAUNCH_MODE:-GROUP}"
  # 90% of each GPU's memory for JAX (its default preallocates 75%); configs/clip.py's
  # per-GPU batches are sized for 80 GB; the rest is for cuDNN/cuBLAS workspaces and NCCL.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  # A jax without CUDA then fails at start instead of training on the CPU.
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
}

main() {
  set -euo pipefail
  local repo python
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # shellcheck source=SCRIPTDIR/local.sh disable=SC1091
  source "${repo}/launch/local.sh"  # find_python
  python="$(find_python "${repo}")"
  gpu_env
  local cmd=("${python}" -m clip_jax.train "$@")
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    env | grep -E '^(XLA_FLAGS|XLA_PYTHON_CLIENT_MEM_FRACTION|NCCL_[A-Z0-9_]+|JAX_PLATFORMS)=' | sort
    printf '%q ' "${cmd[@]}"; echo
  else
    exec "${cmd[@]}"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
