# kubetron developer entry points. Every target installs what it needs (idempotent, cached).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export KUBETRON_CACHE ?= $(HOME)/.cache/kubetron

.PHONY: setup test test-unit lint demo tools images cluster-up cluster-down crd generate fmt

setup:
	@bash hack/setup-venv.sh

tools:
	@bash hack/build-tools.sh

# The operator, CPU trainer and pause images from the Dockerfile (buildah, no daemon), as OCI
# archives the real node's containerd imports; rebuilt only when their inputs change.
images: tools
	@bash hack/build-images.sh

# make test: unit, distributed, cluster and e2e tests; builds the tools and images when missing.
test: setup tools images
	@bash hack/run-tests.sh

test-unit: setup
	@$(PY) -m pytest -q tests/unit

lint: setup
	@$(PY) -m ruff check api operator trainer devtools tests benchmarks hack
	@$(PY) -m ruff format --check api operator trainer devtools tests benchmarks hack
	@$(PY) -m mypy

fmt: setup
	@$(PY) -m ruff format api operator trainer devtools tests benchmarks hack
	@$(PY) -m ruff check --fix api operator trainer devtools tests benchmarks hack

# Regenerate the checked-in CRD from the pydantic models.
generate crd: setup
	@$(VENV)/bin/kubetron crd > manifests/crds/kubetron.io_megatronjobs.yaml
	@cp manifests/crds/kubetron.io_megatronjobs.yaml charts/kubetron/files/crds/
	@$(VENV)/bin/kubetron rbac > manifests/rbac/operator.yaml
	@$(VENV)/bin/kubetron rbac --helm > charts/kubetron/templates/_rbac.tpl
	@$(VENV)/bin/kubetron runtime > charts/kubetron/files/trainjob-runtime.yaml
	@echo "wrote manifests/crds/, charts/kubetron/files/crds/, manifests/rbac/ and the chart's _rbac.tpl"

# make demo: the CPU example through Kubernetes on the local cluster (kept up; DOWN=1 stops it).
demo: setup tools images
	@bash hack/demo.sh

cluster-up: setup tools images
	@$(PY) -m devtools.cluster up

cluster-down: setup
	@$(PY) -m devtools.cluster down
