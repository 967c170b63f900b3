#!/usr/bin/env bash
# Set up nemo_minitron on a CPU machine: a virtual environment (.venv, or the active one), the
# package with the extras named in EXTRAS (default: slurm; scripts/test.sh adds test and eval, the
# lm-evaluation-harness adapter, which takes ~30 s and 0.5 GB more), and the embedded offline
# assets (SmolLM2-135M teacher converted to a checkpoint, a tokenised Wikipedia sample, downstream
# eval data) in ~/.cache/nemo_minitron.
# On GPU clusters use docker/Dockerfile instead (NGC base with Transformer Engine and apex).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  VENV=${VENV:-.venv}
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
echo "== installing into $(python -c 'import sys; print(sys.prefix)')"
# torch first, pinned: the CPU wheel. A bare `torch` requirement would resolve a CUDA build.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[${EXTRAS:-slurm}]"
echo "== embedded assets"
python -m nemo_minitron.assets install
