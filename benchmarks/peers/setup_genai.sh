#!/usr/bin/env bash
# Creates the onnxruntime-genai peer's own environment (its model builder needs transformers 5.x, kvarray's
# reference extra pins 4.x). Idempotent: an existing, working venv is kept.
#   benchmarks/peers/setup_genai.sh [VENV_DIR]     (default: .venv-genai at the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-genai}"
PYTHON="${PYTHON:-python3}"
GENAI_VERSION="${GENAI_VERSION:-0.18.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import onnxruntime_genai, onnx_ir, transformers" 2>/dev/null; then
    echo "genai venv ready: $VENV"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# torch pinned: the CPU wheel of that version is the one the builder needs (it loads the checkpoint)
"$VENV/bin/pip" install --quiet \
    "onnxruntime-genai==$GENAI_VERSION" "transformers==$TRANSFORMERS_VERSION" "torch==2.13.0" \
    onnx onnx-ir safetensors sentencepiece protobuf numpy
"$VENV/bin/python" -c "import onnxruntime_genai as og, transformers; print('onnxruntime-genai', og.__version__, 'transformers', transformers.__version__)"
