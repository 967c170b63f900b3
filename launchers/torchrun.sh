#!/usr/bin/env bash
# One node: run a stage on N local processes (GPUs, or CPU ranks with gloo).
#   launchers/torchrun.sh 8 evaluate model.checkpoint=ckpt/llama8b parallel.tp=8
# Everything after N is passed to `minitron` unchanged (stage name + Hydra overrides).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC STAGE [hydra overrides...]" >&2
  exit 2
fi
NPROC=$1; shift
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # CPU ranks share the cores: one thread each avoids a ~40x oversubscription slow-down.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec torchrun --standalone --nproc-per-node="$NPROC" -m nemo_minitron "$@"
