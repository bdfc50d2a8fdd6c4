#!/usr/bin/env bash
# The whole test suite: three pytest processes, because the CUDA simulator is process-wide.
#   1. everything that runs natively (CPU kernels, caches, graphs, CLI; gpu-marked tests skip without a device)
#   2. the CUDA kernels under NUMBA_ENABLE_CUDASIM=1 on tiny shapes
#   3. the CUDA kernels compiled to PTX for sm_80 / sm_90 and assembled with ptxas (no device needed)
# Extra arguments go to the first process. Exits non-zero if any process fails.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0
"$PY" -m pytest -m "not cudasim and not ptx" "$@" || status=1
NUMBA_ENABLE_CUDASIM=1 "$PY" -m pytest -m cudasim || status=1
"$PY" -m pytest -m ptx || status=1
exit $status
