#!/bin/bash
# First run of the image on a GPU machine: the image must hold TransformerEngine, then the GPU
# qualification (tools/gpu_check.py, ~6 minutes on one GPU; report in runs/gpu-check/).
#   docker run --gpus all --ipc=host --rm megatron-mesh bash docker/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python - <<'PY'
import megatron_mesh  # noqa: F401  (before megatron.core)
from megatron_mesh.model.layers import transformer_engine_available

assert transformer_engine_available(), "megatron-core cannot use TransformerEngine in this image"
PY
make gpu-check GPU_PYTHON=python
