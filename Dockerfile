# syntax=docker/dockerfile:1
# kubetron images. Two targets:
#   docker build --target operator -t ghcr.io/kubetron/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetron/trainer:0.1.0 .
# The operator image holds only the operator's dependencies (no torch); the trainer image is
# NVIDIA's NGC PyTorch image (CUDA, NCCL, Transformer Engine, torch built for them) plus
# Megatron-Core and kubetron.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG NGC_PYTORCH_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3

# ---------------------------------------------------------------- operator: build stage
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# A virtual environment is easy to copy whole into the runtime stage, without pip in it.
RUN python -m venv /opt/kubetron
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN /opt/kubetron/bin/python -m pip install ".[operator]"

# ---------------------------------------------------------------- operator: runtime
FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="kubetron-operator" \
      org.opencontainers.image.description="kubetron operator: MegatronJob -> Kubeflow PyTorchJob" \
      org.opencontainers.image.source="https://github.com/kubetron/kubetron" \
      org.opencontainers.image.licenses="Apache-2.0"
# No .pyc writes (the chart mounts the root filesystem read-only), logs unbuffered.
ENV PATH=/opt/kubetron/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=operator-build /opt/kubetron /opt/kubetron
# A numeric non-root user, so the kubelet can verify runAsNonRoot (65532 as in distroless).
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["kubetron-operator"]

# ---------------------------------------------------------------- trainer
FROM ${NGC_PYTORCH_IMAGE} AS trainer
LABEL org.opencontainers.image.title="kubetron-trainer" \
      org.opencontainers.image.description="kubetron trainer: Megatron-Core on torchrun" \
      org.opencontainers.image.source="https://github.com/kubetron/kubetron" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/kubetron/src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# NGC images set PIP_CONSTRAINT to a file pinning the torch, NCCL and Transformer Engine they
# ship, so this adds Megatron-Core and kubetron without replacing NVIDIA's CUDA build of torch.
# DL3013 (pin versions): this is the local project; pyproject.toml bounds its dependencies.
# [fast]: liger-kernel (pure Python + Triton) for recipe.fastPath when TE is absent.
# hadolint ignore=DL3013
RUN pip install ".[trainer,fast]" \
    && python -c "import torch, megatron.core, kubetron_trainer; print(torch.__version__)"
# A non-root user with a home for Triton/Transformer Engine caches (UID 1000 is Ubuntu's own).
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin kubetron
WORKDIR /home/kubetron
USER 10001:10001
EXPOSE 9400
# The operator's pod template sets the command: torchrun -m kubetron_trainer --config <file>.
CMD ["python", "-m", "kubetron_trainer", "--help"]
