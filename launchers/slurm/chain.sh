#!/usr/bin/env bash
# Submit pipeline stages as a chain of dependent Slurm jobs: each stage starts only after the
# previous one succeeded (--dependency=afterok:<id>); if one fails, the rest are cancelled
# (--kill-on-invalid-dep=yes) instead of pending forever.
#
#   launchers/slurm/chain.sh [sbatch options...] -- STAGE [overrides...] [-- STAGE [overrides...]]...
#
#   launchers/slurm/chain.sh --nodes=1 -p batch -A myproj \
#     -- finetune model.checkpoint=ckpt/llama8b data.prefix=data/corpus output=ckpt/llama8b_ft \
#     -- prune    model.checkpoint=ckpt/llama8b_ft prune=llama3_1_8b_to_4b_width output=ckpt/llama4b \
#     -- distill  model.checkpoint=ckpt/llama4b kd.teacher=ckpt/llama8b_ft output=ckpt/llama4b_kd \
#     -- evaluate model.checkpoint=ckpt/llama4b_kd data.prefix=data/corpus parallel.tp=8 \
#     -- export   model.checkpoint=ckpt/llama4b_kd output=hf/llama4b dtype=bf16
#
# Options before the first `--` go to every sbatch call (they override the batch script's
# #SBATCH lines). Options between a `--` and its STAGE apply to that job only:
#     -- --nodes=4 --time=2-00:00:00 distill ...
# STAGE and its Hydra overrides reach `python -m nemo_minitron` unchanged. import, export and data
# are single-process stages: they get --nodes=1 --ntasks-per-node=1 (and NPROC_PER_NODE=1 for the
# torchrun script), placed before the job's own options, which still win.
#
# Environment: MINITRON_SBATCH, the batch script (default minitron.sbatch beside this file;
# minitron_torchrun.sbatch for torchrun); AFTER=<job id>, a job the first stage waits for.
# Prints "<job id> <stage>" per job; the last id is the chain's end.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=${MINITRON_SBATCH:-$here/minitron.sbatch}
common=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in -h|--help) usage ;; esac
  common+=("$1"); shift
done
[ $# -gt 1 ] || usage

prev=${AFTER:-}
while [ $# -gt 0 ]; do
  shift  # the "--"
  opts=()
  while [ $# -gt 0 ] && [ "$1" != "--" ] && [[ $1 == -* ]]; do opts+=("$1"); shift; done
  args=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
  if [ ${#args[@]} -eq 0 ]; then
    echo "chain.sh: a '--' without a stage after it" >&2
    exit 2
  fi
  stage=${args[0]}
  flags=(--parsable "--job-name=minitron-$stage")
  if [ -n "$prev" ]; then flags+=("--dependency=afterok:$prev" --kill-on-invalid-dep=yes); fi
  flags+=(${common[@]+"${common[@]}"})
  case $stage in import|export|data) flags+=(--nodes=1 --ntasks-per-node=1 --export=ALL,NPROC_PER_NODE=1) ;; esac
  flags+=(${opts[@]+"${opts[@]}"})
  id=$(sbatch "${flags[@]}" "$script" "${args[@]}")
  prev=${id%%;*}  # --parsable prints "id[;cluster]"
  echo "$prev $stage"
done
