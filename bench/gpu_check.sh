#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): one call on a GPU machine, under 5 minutes, a JSON report in
# $OUT (the device tool's folder that comes back) or bench/reports/. On the device machine the project's
# packages that its image lacks travel as wheels in .gpu/wheels/ (made here by `python -m bench.gpu_check prepare`, carried with
# the call); they are installed into /tmp/site first. Run from the repository root:
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] && python=.venv/bin/python
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec "$python" -m bench.gpu_check run --device "${DEVICE:-cuda}" "$@"
