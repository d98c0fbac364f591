#!/usr/bin/env bash
# Placeholder demo until the trainer lands: validate every example, render one PyTorchJob.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/kubetron validate manifests/examples/*.yaml
.venv/bin/kubetron render manifests/examples/qwen3-8b-2x8.yaml
