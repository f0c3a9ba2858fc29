#!/usr/bin/env bash
# The GPU backends on a real GPU, in one prepared run (issue 19; benchmarks/gpu_check.py says what it does).
#
# On a lent GPU machine, from the repository root:   bash benchmarks/gpu_check.sh
# It writes gpu_check.json and gpu_check.txt under $OUT (the device tool's folder) or runs/gpu-check/, and ends
# within 8 minutes (the Python stages run under a 470 s timeout). The H200 image already holds numpy, numba,
# numba-cuda, cupy-cuda13x, torch, pytest and hypothesis; anything else travels as wheels in .whl/ (named in the
# run's carry), installed here first. Its own test runs it on a CPU:  NUMBA_ENABLE_CUDASIM=1 bash ... --simulate
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
python=$(command -v python3 || command -v python)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$("$python" -c '
import importlib.util as u
print(" ".join(n for n in ("numpy", "numba", "pytest", "hypothesis", "tqdm", "threadpoolctl") if u.find_spec(n) is None))')
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (carry their wheels in .whl/)" >&2
    exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec timeout 470 "$python" -m benchmarks.gpu_check --out "${OUT:-runs/gpu-check}" "$@"
