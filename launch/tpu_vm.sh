#!/usr/bin/env bash
# Cloud TPU VM lifecycle for clip_jax: create (on-demand, spot or queued), install the repo
# on every worker, train with one config on all workers, tail logs, delete.
#
#   launch/tpu_vm.sh [--dry_run] create|setup|train|logs|ssh|delete [TRAIN_ARGS...]
#
# Settings (environment): TPU_NAME, TPU_ZONE, TPU_TYPE (e.g. v4-32), TPU_VERSION
# (runtime, default tpu-ubuntu2204-base), TPU_MODE (on_demand | spot | queued, default
# on_demand), TPU_SPOT (queued only: 1 asks for spot capacity, default 0), TPU_PROJECT
# (optional), BUCKET (gs:// workdir root), REPO_URL / REPO_REF (default: this checkout's
# origin and HEAD). --dry_run prints the gcloud commands instead of running them.
#
# `setup` updates the checkout ~/clip_jax on every worker in place (git fetch from REPO_URL,
# then checks out REPO_REF detached; it clones only where there is none, and never deletes:
# the venv, logs and other files there stay), so REPO_REF must be pushed: when it is a
# local commit that no branch of origin contains, setup stops and says so (push it, or set
# REPO_REF to a pushed branch, tag or commit). Uncommitted changes are never deployed;
# setup warns about them. Every value that reaches a worker's shell is quoted (printf %q),
# and the credentials of a URL (https://USER:TOKEN@...) never reach this script's output.
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
TPU_SPOT="${TPU_SPOT:-0}"
repo="$(dirname "$0")/.."
origin_url="$(git -C "$repo" remote get-url origin 2>/dev/null || true)"
REPO_URL="${REPO_URL:-${origin_url:-https://github.com/clip-jax/clip_jax}}"
REPO_REF="${REPO_REF:-$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo main)}"
project_flag=()
[[ -n "${TPU_PROJECT:-}" ]] && project_flag=(--project "$TPU_PROJECT")

run() {
  if [[ $dry_run -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# Copies stdin to stdout with the credentials of every URL (scheme://USER:TOKEN@) as ***.
mask_credentials() {
  sed -E 's#(://)[^/@[:space:]]+@#\1***@#g'
}

# The workers can only check out what origin has: a local commit that no remote-tracking
# branch of origin contains (as of the last fetch or push) stops setup with a message.
check_ref_is_pushed() {
  [[ -n "$origin_url" && "$REPO_URL" == "$origin_url" ]] || return 0  # another repo: unknown
  local commit branches
  commit="$(git -C "$repo" rev-parse --verify -q "${REPO_REF}^{commit}" 2>/dev/null)" || return 0
  branches="$(git -C "$repo" branch -r --contains "$commit" 2>/dev/null || true)"
  if [[ $'\n'"$branches" != *$'\n  origin/'* ]]; then
    echo "error: REPO_REF ${REPO_REF} (${commit:0:12}) is not pushed: no branch of origin" \
      "contains it, so the workers cannot check it out. Push it (git push), or set REPO_REF" \
      "to a pushed branch, tag or commit." >&2
    exit 2
  fi
  if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    echo "warning: this checkout has uncommitted changes; the workers get ${REPO_REF}" \
      "without them." >&2
  fi
}

# Runs the shell command $1 on every worker; its values must already be quoted (printf %q).
# Both output streams are masked: the command may carry REPO_URL's token.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" "${project_flag[@]}" \
    --worker=all --command "$1" 2> >(mask_credentials >&2) | mask_credentials
}

# The worker's setup: the checkout ~/clip_jax updated in place (cloned only when absent),
# REPO_REF checked out detached (origin's branch of that name first, else a tag or commit),
# the venv made once, clip_jax installed. Nothing is deleted; a worker's local edits that
# the checkout would overwrite stop it (git refuses).
setup_command() {
  local url ref
  url=$(printf '%q' "$REPO_URL")
  ref=$(printf '%q' "$REPO_REF")
  printf '%s; ' 'set -e' \
    "if [ -d clip_jax/.git ]; then git -C clip_jax remote set-url origin $url; else git clone -q $url clip_jax; fi" \
    'cd clip_jax' 'git fetch -q --force --tags origin' \
    "commit=\$(git rev-parse -q --verify origin/$ref^{commit} || git rev-parse -q --verify $ref^{commit}) || { echo error: REPO_REF $ref is no branch, tag or commit of REPO_URL >&2; exit 2; }" \
    "git checkout -q --detach \"\$commit\"" \
    '[ -x .venv/bin/python ] || python3 -m venv .venv'
  printf '%s' ".venv/bin/pip install -q -U 'jax[tpu]' -e ."
}

case "$command" in
  create)
    case "$TPU_MODE" in
      on_demand) run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$TPU_ZONE" \
                   "${project_flag[@]}" --accelerator-type "$TPU_TYPE" --version "$TPU_VERSION" ;;
      spot) run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$TPU_ZONE" \
              "${project_flag[@]}" --accelerator-type "$TPU_TYPE" --version "$TPU_VERSION" --spot ;;
      queued)
        spot_flag=()
        case "$TPU_SPOT" in
          1) spot_flag=(--spot) ;;
          0) ;;
          *) echo "TPU_SPOT must be 0 or 1" >&2; exit 2 ;;
        esac
        run gcloud compute tpus queued-resources create "$TPU_NAME" --zone "$TPU_ZONE" \
          "${project_flag[@]}" --node-id "$TPU_NAME" --accelerator-type "$TPU_TYPE" \
          --runtime-version "$TPU_VERSION" "${spot_flag[@]}" ;;
      *) echo "TPU_MODE must be on_demand, spot or queued" >&2; exit 2 ;;
    esac ;;
  setup)
    check_ref_is_pushed
    on_all_workers "$(setup_command)" ;;
  train)
    : "${BUCKET:?set BUCKET (gs:// root for the workdir)}"
    workdir=$(printf '%q' "${BUCKET}/runs/${TPU_NAME}")
    args=$(printf '%q ' "$@")
    on_all_workers "cd clip_jax && nohup .venv/bin/python -m clip_jax.train \
--workdir ${workdir} ${args} > train.log 2>&1 &" ;;
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
