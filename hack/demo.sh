#!/usr/bin/env bash
# make demo: the CPU example trained through Kubernetes (devtools/demo.py): the local cluster
# with its real node, `helm install` of the chart, `kubectl apply` of
# manifests/examples/gpt-tiny-cpu.yaml, and what a user watches until it Succeeded. The cluster
# stays up afterwards; `make demo DOWN=1` (or `hack/demo.sh --down`) stops it at the end, and
# `make test` (hack/run-tests.sh) stops it before the tests start their own.
# The Makefile runs `make setup tools images` first.
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [[ "${DOWN:-}" == "1" ]]; then args+=(--down); fi
exec .venv/bin/python -m devtools.demo "${args[@]}"
