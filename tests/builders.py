"""Small builders for MegatronJob test objects: `make_job(nodes=2, tensor=4)`."""

from __future__ import annotations

import copy
from typing import Any

from kubetron_api.parse import parse_job
from kubetron_api.v1alpha1 import MegatronJob

BASE: dict[str, Any] = {
    "apiVersion": "kubetron.io/v1alpha1",
    "kind": "MegatronJob",
    "metadata": {"name": "job", "namespace": "ml", "uid": "0000-1111"},
    "spec": {
        "model": {"preset": "qwen3-1.7b"},
        "recipe": {"globalBatchSize": 16, "microBatchSize": 1, "seqLength": 4096},
        "resources": {"nodes": 1, "gpusPerNode": 8},
    },
}

_SECTIONS = {
    "model": {"weights"},
    "recipe": {
        "trainIters",
        "globalBatchSize",
        "microBatchSize",
        "seqLength",
        "precision",
        "fastPath",
        "kind",
        "recomputeLayers",
    },
    "parallelism": {
        "tensor",
        "pipeline",
        "virtualPipeline",
        "context",
        "expert",
        "expertTensor",
        "sequenceParallel",
    },
    "resources": {
        "nodes",
        "gpusPerNode",
        "device",
        "image",
        "cpu",
        "memory",
        "sharedMemory",
        "podSecurityContext",
        "securityContext",
    },
}


def job_dict(preset: str | None = None, **fields: Any) -> dict[str, Any]:
    """A MegatronJob dict; keywords are camelCase fields of recipe, parallelism, resources."""
    obj = copy.deepcopy(BASE)
    spec = obj["spec"]
    if preset:
        spec["model"]["preset"] = preset
    for key, value in fields.items():
        section = next((s for s, names in _SECTIONS.items() if key in names), None)
        if section is None:
            raise KeyError(f"make_job: unknown field {key}")
        spec.setdefault(section, {})[key] = value
    return obj


def make_job(preset: str | None = None, **fields: Any) -> MegatronJob:
    return parse_job(job_dict(preset, **fields))
