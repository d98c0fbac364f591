# syntax=docker/dockerfile:1
# kubetron images. Two targets:
#   docker build --target operator -t ghcr.io/kubetron/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetron/trainer:0.1.0 .
# The operator image holds only the operator's dependencies (no torch). The trainer image is, by
# default (the GPU build), NVIDIA's NGC PyTorch image (CUDA, NCCL, Transformer Engine, torch built
# for them) plus Megatron-Core and kubetron.
#
# CPU build without a Docker daemon: hack/build-images.sh builds a Debian python base
# (localhost/kubetron/python-base:<hash>, a venv on PATH like python:*-slim) and runs buildah with
#   --build-arg PYTHON_IMAGE=localhost/kubetron/python-base:<hash>           (operator)
#   --build-arg TRAINER_BASE=localhost/kubetron/python-base:<hash> \
#   --build-arg TRAINER_PINS="torch==2.14.1 megatron-core==0.19.2"          (trainer: 0.1.0-cpu)
# TRAINER_PINS are requirements-constraints.txt's pins, for bases that bring no torch of their own.
#
# Layer caching: each image installs its dependencies from pyproject.toml alone (an empty README and
# empty package directories stand in for the rest), then copies the sources and installs kubetron
# with --no-deps, so a source change does not reinstall torch. Pip's download cache is a build cache
# mount, never part of an image.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG TRAINER_BASE=nvcr.io/nvidia/pytorch:25.09-py3

# ---------------------------------------------------------------- operator: build stage
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# A virtual environment is easy to copy whole into the runtime stage, without pip in it.
RUN python -m venv /opt/kubetron
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p api operator && touch README.md \
    && /opt/kubetron/bin/python -m pip install ".[operator]" \
    && /opt/kubetron/bin/python -m pip uninstall --yes kubetron \
    && rm -rf build ./*.egg-info README.md api operator
# The contract and the operator only: no trainer code in this image (the last check proves it).
COPY README.md ./
COPY api/ api/
COPY operator/ operator/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/kubetron/bin/python -m pip install --no-deps . \
    && /opt/kubetron/bin/python -c "import importlib.util as u, kubetron_operator.__main__; \
assert u.find_spec('kubetron_trainer') is None and u.find_spec('torch') is None"

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
FROM ${TRAINER_BASE} AS trainer
LABEL org.opencontainers.image.title="kubetron-trainer" \
      org.opencontainers.image.description="kubetron trainer: Megatron-Core on torchrun" \
      org.opencontainers.image.source="https://github.com/kubetron/kubetron" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# A non-root user with a home for Triton/Transformer Engine caches (UID 1000 is Ubuntu's own).
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin kubetron
WORKDIR /opt/kubetron/src
COPY pyproject.toml ./
# NGC images set PIP_CONSTRAINT to a file pinning the torch, NCCL and Transformer Engine they
# ship, so this adds Megatron-Core and kubetron without replacing NVIDIA's CUDA build of torch;
# TRAINER_PINS (empty by default) adds pins for bases without a torch of their own.
# DL3013 (pin versions): this is the local project; pyproject.toml bounds its dependencies.
# [fast]: liger-kernel (pure Python + Triton) for recipe.fastPath when TE is absent.
ARG TRAINER_PINS=""
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p api trainer && touch README.md \
    && for pin in $TRAINER_PINS; do echo "$pin"; done >/tmp/kubetron-pins.txt \
    && PIP_CONSTRAINT="${PIP_CONSTRAINT:-} /tmp/kubetron-pins.txt" pip install ".[trainer,fast]" \
    && pip uninstall --yes kubetron \
    && rm -rf /tmp/kubetron-pins.txt build ./*.egg-info README.md api trainer
# The contract and the trainer only: the operator's code is not needed in a training pod.
COPY README.md ./
COPY api/ api/
COPY trainer/ trainer/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && python -c "import torch, megatron.core, kubetron_trainer; print(torch.__version__)"
WORKDIR /home/kubetron
USER 10001:10001
EXPOSE 9400
# The operator's pod template sets the command: torchrun -m kubetron_trainer --config <file>.
CMD ["python", "-m", "kubetron_trainer", "--help"]
