#!/usr/bin/env bash
# Cloud TPU VM lifecycle for clip_jax: create (on-demand, spot or queued), install the repo
# on every worker, train with one config on all workers, tail logs, delete.
#
#   launch/tpu_vm.sh [--dry_run] create|setup|train|logs|ssh|delete [TRAIN_ARGS...]
#
# Settings (environment): TPU_NAME, TPU_ZONE, TPU_TYPE (e.g. v4-32), TPU_VERSION
# (runtime, default tpu-ubuntu2204-base), TPU_MODE (on_demand | spot | queued),
# TPU_PROJECT (optional), BUCKET (gs:// workdir root), REPO_URL / REPO_REF (default: this
# checkout's origin and HEAD). --dry_run prints the gcloud commands instead of running them.
#
#   TPU_NAME=clip TPU_ZONE=us-central2-b TPU_TYPE=v4-32 BUCKET=gs://my-bucket \
#     launch/tpu_vm.sh create && launch/tpu_vm.sh setup && \
#     launch/tpu_vm.sh train --config configs/clip.py:model=ViT-B-16 \
#       --config.data.train='gs://my-bucket/laion/{00000..41455}.tar'
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
command="${1:-}"; shift || true

: "${TPU_NAME:?set TPU_NAME}" "${TPU_ZONE:?set TPU_ZONE}"
TPU_TYPE="${TPU_TYPE:-v4-8}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
TPU_MODE="${TPU_MODE:-on_demand}"
REPO_URL="${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo https://github.com/clip-jax/clip_jax)}"
REPO_REF="${REPO_REF:-$(git -C "$(dirname "$0")/.." rev-parse HEAD 2>/dev/null || echo main)}"
project_flag=()
[[ -n "${TPU_PROJECT:-}" ]] && project_flag=(--project "$TPU_PROJECT")

run() {
  if [[ $dry_run -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" "${project_flag[@]}" \
    --worker=all --command "$1"
}

case "$command" in
  create)
    case "$TPU_MODE" in
      on_demand) run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$TPU_ZONE" \
                   "${project_flag[@]}" --accelerator-type "$TPU_TYPE" --version "$TPU_VERSION" ;;
      spot) run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$TPU_ZONE" \
              "${project_flag[@]}" --accelerator-type "$TPU_TYPE" --version "$TPU_VERSION" --spot ;;
      queued) run gcloud compute tpus queued-resources create "$TPU_NAME" --zone "$TPU_ZONE" \
                "${project_flag[@]}" --node-id "$TPU_NAME" --accelerator-type "$TPU_TYPE" \
                --runtime-version "$TPU_VERSION" --spot ;;
      *) echo "TPU_MODE must be on_demand, spot or queued" >&2; exit 2 ;;
    esac ;;
  setup)
    on_all_workers "set -e; rm -rf clip_jax && git clone -q $REPO_URL clip_jax && \
cd clip_jax && git checkout -q $REPO_REF && python3 -m venv .venv && \
.venv/bin/pip install -q -U 'jax[tpu]' -e ." ;;
  train)
    : "${BUCKET:?set BUCKET (gs:// root for the workdir)}"
    args=$(printf '%q ' "$@")
    on_all_workers "cd clip_jax && nohup .venv/bin/python -m clip_jax.train \
--workdir ${BUCKET}/runs/${TPU_NAME} ${args} > train.log 2>&1 &" ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" "${project_flag[@]}" \
      --worker=0 --command "tail -n 100 -f clip_jax/train.log" ;;
  ssh)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" "${project_flag[@]}" --worker=0 ;;
  delete)
    if [[ "$TPU_MODE" == "queued" ]]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone "$TPU_ZONE" \
        "${project_flag[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$TPU_ZONE" "${project_flag[@]}" --quiet
    fi ;;
  *)
    echo "usage: $0 [--dry_run] create|setup|train|logs|ssh|delete [TRAIN_ARGS...]" >&2; exit 2 ;;
esac
