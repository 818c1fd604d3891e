#!/bin/bash
# First run of the image on a GPU machine: versions, TransformerEngine spec, FLOP count, and a
# one-GPU training-step benchmark of Pythia-160M 2+4R2+2, base vs MeSH (a minute or two).
#   docker run --gpus all --ipc=host --rm megatron-mesh bash docker/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python - <<'PY'
import torch
import megatron_mesh  # noqa: F401  (before megatron.core)
from megatron.core import package_info
from megatron_mesh.layers import transformer_engine_available

assert torch.cuda.is_available(), "no GPU visible: run with --gpus all"
import transformer_engine
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), TransformerEngine "
      f"{transformer_engine.__version__}, megatron-core {package_info.__version__}, "
      f"GPU {torch.cuda.get_device_name()}")
assert transformer_engine_available(), "megatron-core cannot use TransformerEngine in this image"
PY
python tools/model_stats.py --config configs/pythia-410m-4+8R2+4-mesh.yml
python tools/benchmark.py --config configs/pythia-160m-2+4R2+2-base.yml --compare model.state_scheme=mesh \
    --batch 4 --seq-length 2048 --iters 10
