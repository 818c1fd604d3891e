# megatron-mesh on NVIDIA's NGC PyTorch image, for GPU training (single node or multi-node).
#
#   docker build -t megatron-mesh .
#   docker run --gpus all --ipc=host --rm megatron-mesh bash docker/smoke.sh
#
# NOT built or run in this repository's CI (the development machines have no GPU and build no
# images): treat it as a starting point and run docker/smoke.sh once on your GPU machine.
#
# Base image: nvcr.io/nvidia/pytorch:26.06-py3, chosen because
#   - NGC 26.xx images ship Python 3.12 (Ubuntu 24.04). megatron-core 0.19.2's wheel declares
#     Requires-Python >= 3.12, so it installs here without the --ignore-requires-python that the
#     CPU/CI setup (Python 3.11) needs;
#   - Megatron-LM's dev CI image is built on it (docker/Dockerfile.ci.dev at one commit of its
#     main branch says FROM nvcr.io/nvidia/pytorch:26.06-py3; later commits move to 26.08), and
#     megatron-core 0.19.2 has code paths gated on torch >= 2.11 and TransformerEngine up to
#     2.14, which an image of that age should provide (NGC 26.05 already ships torch 2.12 with
#     CUDA 13.2); older images still run but lose those paths. Megatron's install guide also
#     advises the previous month's NGC release over the newest one;
#   - it bundles CUDA 13, cuDNN, NCCL and TransformerEngine (and, depending on the release, apex
#     and flash-attn) built against its own torch, which this Dockerfile keeps untouched (see the
#     constraints below): only packages that do not link against torch or CUDA are added, plus
#     megatron-core with --no-deps.
# CUDA 13 needs an R580 or newer driver on the host (datacenter GPUs can also use CUDA forward
# compatibility). To use another release, e.g. Megatron-LM's LTS base 25.09 (CUDA 13.0):
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3 -t megatron-mesh .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.06-py3
FROM ${BASE_IMAGE}

# The NGC image pins its whole Python environment through PIP_CONSTRAINT, which would refuse our
# pins (transformers, datasets, ...); we replace it with a constraints file that pins only what
# must not move: torch and everything compiled against it or bundled with CUDA.
ENV PIP_CONSTRAINT= \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron-mesh

# Dependencies first (a layer that survives code edits).
COPY requirements/ requirements/
COPY docker/ docker/
RUN set -eux; \
    python -c 'import sys; assert sys.version_info >= (3, 12), f"megatron-core 0.19.2 needs Python >= 3.12, this image has {sys.version}"'; \
    pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|numpy|transformer[-_]engine[-_a-z0-9]*|flash[-_]attn[-_a-z0-9]*|apex|nvidia[-_][-_a-z0-9]*|cuda[-_][-_a-z0-9]*|cupy[-_a-z0-9]*|nvfuser[-_a-z0-9]*)==' \
      > /etc/megatron-mesh-image-pins.txt; \
    cat /etc/megatron-mesh-image-pins.txt; \
    grep -iq '^torch==' /etc/megatron-mesh-image-pins.txt; \
    pip install -c /etc/megatron-mesh-image-pins.txt -r requirements/docker.txt; \
    pip install --no-deps -r requirements/megatron.txt; \
    python docker/check_image_pins.py /etc/megatron-mesh-image-pins.txt

# The package itself, editable so that a host checkout mounted over /workspace/megatron-mesh
# (docker run -v "$PWD":/workspace/megatron-mesh ...) is what runs.
COPY . .
RUN pip install --no-deps -e .

# No ENTRYPOINT of our own (the NGC entrypoint stays): run torchrun, tools/*.py or bash.
