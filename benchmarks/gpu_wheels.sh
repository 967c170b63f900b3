#!/usr/bin/env bash
# Download, on this (CPU, networked) machine, the wheels that benchmarks/gpu_check.py needs on the
# lent GPU machine (Python 3.12, torch 2.11+cu130, numpy, packaging, tqdm, pyyaml, tensorboard, no
# network) into .whl/ (ignored by git), and check that they fit the 64 MiB a device call carries.
#
#   bash benchmarks/gpu_wheels.sh            # then the one device call of docs/benchmarks.md, "GPU check"
#
# What travels: megatron-core 0.16.1 (the release the suite is written against). Its py3.12 wheel
# is platform-specific (cp312 manylinux_2_24/2_28 x86_64: it carries the compiled dataset helper
# helpers_cpp, 5.4 MB unpacked), 2.6 MB; it needs only torch, numpy and packaging, all on that machine.
#
# What does not: Transformer Engine. transformer-engine-cu13 2.20.2 (the core library,
# libtransformer_engine.so 343 MB unpacked) is a 276.5 MB wheel, 2.20.2's oldest cu13 sibling
# 2.9.0 still 185.7 MB: 3-4x the 64 MiB carried per call. Its PyTorch binding,
# transformer-engine-torch, exists on PyPI only as a 498 kB sdist that must be compiled against the
# exact torch (2.11+cu130) and the cuBLAS/cuDNN/NCCL headers (this machine has only a partial CUDA
# 13.0 toolkit and a CPU torch), and is useless without the core library anyway. So the TE spec and
# FP8 parts report "not available" there (docs/benchmarks.md, "GPU check", has the figures).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MCORE=megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
MCORE_SHA256=3fb26cb407aa3c4b609c08664022c08146f1648b3d6f2ef2bbe9d3b1294ace61
LIMIT=$((64 * 1024 * 1024))

mkdir -p .whl
# one version of each package only: two would stop the install there
find .whl -name 'megatron_core-*.whl' ! -name "$MCORE" -delete
if [ ! -f ".whl/$MCORE" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
fi
echo "$MCORE_SHA256  .whl/$MCORE" | sha256sum -c --quiet -
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl
echo "wheels: $total bytes of the $LIMIT a device call carries (with the tracked tree)"
if [ "$total" -ge "$LIMIT" ]; then
  echo "too large to carry; remove what gpu_check.py does not need from .whl/" >&2
  exit 1
fi
