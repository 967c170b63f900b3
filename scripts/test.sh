#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test,slurm,eval}" bash scripts/setup.sh
if [ -z "${VIRTUAL_ENV:-}" ]; then . "${VENV:-.venv}/bin/activate"; fi
python -m pytest "$@"
