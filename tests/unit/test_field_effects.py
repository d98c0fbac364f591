"""Every field of the configuration reference does something.

Each leaf field of the MegatronJob spec (from the generated CRD, so a new field must be listed
here) either changes what the operator renders when it changes (the trainer config in the
ConfigMap, or the PyTorchJob and its pods), or is named with the test that shows its effect
elsewhere (the operator's lifecycle, admission). Every field of the trainer config is read by
the trainer's code.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path
from typing import Any

import pytest

from kubetron_api.config import TrainerConfig
from kubetron_api.parse import parse_job
from kubetron_operator.cli.crd import crd
from kubetron_operator.plan import plan
from kubetron_operator.render import render
from tests.builders import job_dict

ROOT = Path(__file__).resolve().parents[2]

# A job of two models (recipe dpo) instead of spec.model: a field of spec.models changes the
# models of the trainer config. `_models` is the list with the policy and the reference changed.
POLICY: dict[str, Any] = {"name": "policy", "preset": "gpt-tiny"}
REFERENCE: dict[str, Any] = {
    "name": "reference", "preset": "gpt-tiny", "trainable": False, "weights": "/m/sft",
}  # fmt: skip


def _models(policy: dict[str, Any] | None = None, reference: dict[str, Any] | None = None) -> Any:
    return [{**POLICY, **(policy or {})}, {**REFERENCE, **(reference or {})}]


TWO: dict[str, Any] = {
    "spec.model": None, "spec.models": _models(), "spec.recipe.kind": "dpo",
    "spec.recipe.seqLength": 256, "spec.recipe.globalBatchSize": 24,
}  # fmt: skip
# A value of each override that keeps the two-model job valid.
OVERRIDES = (
    ("numLayers", 4), ("hiddenSize", 128), ("ffnHiddenSize", 512), ("numAttentionHeads", 8),
    ("numQueryGroups", 4), ("kvChannels", 32), ("vocabSize", 1024),
    ("maxPositionEmbeddings", 1024), ("numExperts", 8), ("moeRouterTopk", 1),
    ("moeFfnHiddenSize", 64),
)  # fmt: skip
MOE = {**TWO, "spec.models": _models({"preset": "gpt-tiny-moe"})}
TENSOR_2 = {**TWO, "spec.models": _models({"parallelism": {"tensor": 2}})}
STAGES_2 = {
    **TWO,
    "spec.models": _models({"overrides": {"numLayers": 4}, "parallelism": {"pipeline": 2}}),
}
SLICES = {
    **TWO,
    "spec.models": _models(
        {"ranks": {"first": 0, "count": 4}}, {"ranks": {"first": 4, "count": 4}}
    ),
}

# A LoRA finetune: a field of recipe.peft changes the trainer config's (type: LoRA on).
LORA: dict[str, Any] = {
    "spec.model.weights": "/hf/a", "spec.recipe.kind": "finetune", "spec.recipe.peft": {},
}  # fmt: skip
PEFT_VALUES = (
    ("rank", 8), ("alpha", 4.0), ("dropout", 0.1), ("targets", ["qkv"]), ("adapters", "/m/a"),
)  # fmt: skip

# field -> (new value, changes applied to both the base and the changed job)
CHANGES: dict[str, tuple[Any, dict[str, Any]]] = {
    "spec.model.preset": ("qwen3-4b", {}),
    "spec.model.overrides.numLayers": (14, {}),
    "spec.model.overrides.hiddenSize": (512, {}),
    "spec.model.overrides.ffnHiddenSize": (1024, {}),
    "spec.model.overrides.numAttentionHeads": (8, {}),
    "spec.model.overrides.numQueryGroups": (4, {}),
    "spec.model.overrides.kvChannels": (64, {}),
    "spec.model.overrides.vocabSize": (32000, {}),
    "spec.model.overrides.maxPositionEmbeddings": (8192, {}),
    "spec.model.overrides.numExperts": (16, {}),
    "spec.model.overrides.moeRouterTopk": (4, {"spec.model.overrides.numExperts": 16}),
    "spec.model.overrides.moeFfnHiddenSize": (256, {"spec.model.overrides.numExperts": 16}),
    "spec.model.weights": (
        "/hf/b",
        {"spec.model.weights": "/hf/a", "spec.recipe.kind": "finetune"},
    ),
    "spec.recipe.trainIters": (7, {}),
    "spec.recipe.globalBatchSize": (32, {}),
    "spec.recipe.microBatchSize": (2, {}),
    "spec.recipe.seqLength": (1024, {}),
    "spec.recipe.precision": ("fp32", {}),
    "spec.recipe.optimizer.name": ("sgd", {}),
    "spec.recipe.optimizer.lr": (0.001, {}),
    "spec.recipe.optimizer.minLr": (0.0, {}),
    "spec.recipe.optimizer.weightDecay": (0.0, {}),
    "spec.recipe.optimizer.adamBeta1": (0.8, {}),
    "spec.recipe.optimizer.adamBeta2": (0.999, {}),
    "spec.recipe.optimizer.adamEps": (1e-6, {}),
    "spec.recipe.optimizer.clipGrad": (0.5, {}),
    "spec.recipe.optimizer.distributed": (False, {}),
    "spec.recipe.lrSchedule.style": ("linear", {}),
    "spec.recipe.lrSchedule.warmupIters": (5, {}),
    "spec.recipe.lrSchedule.decayIters": (50, {}),
    "spec.recipe.seed": (7, {}),
    "spec.recipe.logInterval": (1, {}),
    "spec.recipe.eval.interval": (5, {"spec.recipe.eval": {}}),
    "spec.recipe.eval.iterations": (3, {"spec.recipe.eval": {}}),
    "spec.recipe.eval.atEnd": (False, {"spec.recipe.eval": {"interval": 5}}),
    "spec.recipe.peft.type": ("lora", {k: v for k, v in LORA.items() if "peft" not in k}),
    **{f"spec.recipe.peft.{name}": (value, LORA) for name, value in PEFT_VALUES},
    "spec.recipe.fastPath": ("off", {}),
    "spec.recipe.recomputeLayers": (2, {}),
    "spec.parallelism.tensor": (2, {}),
    "spec.parallelism.pipeline": (2, {}),
    "spec.parallelism.virtualPipeline": (2, {"spec.parallelism.pipeline": 2}),
    "spec.parallelism.context": (2, {}),
    "spec.parallelism.expert": (2, {"spec.model.preset": "qwen3-30b-a3b"}),
    "spec.parallelism.expertTensor": (2, {"spec.model.preset": "qwen3-30b-a3b"}),
    "spec.parallelism.sequenceParallel": (True, {"spec.parallelism.tensor": 2}),
    "spec.data.type": ("indexed", {}),  # with a path on the changed side (CHANGED_TOO)
    "spec.data.paths[].prefix": (
        [{"prefix": "/d/b"}],
        {"spec.data.type": "indexed", "spec.data.paths": [{"prefix": "/d/a"}]},
    ),
    "spec.data.paths[].weight": (
        [{"prefix": "/d/a", "weight": 2.0}],
        {"spec.data.type": "indexed", "spec.data.paths": [{"prefix": "/d/a"}]},
    ),
    "spec.data.split": ("90,5,5", {}),
    "spec.data.tokenizer.type": ("huggingface", {"spec.data.tokenizer.name": "/tok"}),
    "spec.data.tokenizer.name": ("/tok2", {"spec.data.tokenizer.name": "/tok"}),
    "spec.checkpoint.path": ("/ckpt", {}),
    "spec.checkpoint.saveInterval": (10, {"spec.checkpoint.path": "/ckpt"}),
    "spec.checkpoint.resume": ("never", {"spec.checkpoint.path": "/ckpt"}),
    "spec.checkpoint.asyncSave": (True, {"spec.checkpoint.path": "/ckpt"}),
    "spec.checkpoint.volume.claimName": ("c", {"spec.checkpoint.path": "/ckpt"}),
    "spec.checkpoint.volume.readOnly": (
        True,
        {"spec.checkpoint.path": "/ckpt", "spec.checkpoint.volume": {"claimName": "c"}},
    ),
    "spec.resources.nodes": (2, {"spec.recipe.globalBatchSize": 16}),
    "spec.resources.gpusPerNode": (4, {}),
    "spec.resources.image": ("example.com/trainer:1", {}),
    "spec.resources.imagePullPolicy": ("Always", {}),
    "spec.resources.device": ("cpu", {"spec.recipe.precision": "fp32"}),
    "spec.resources.gpuResource": ("amd.com/gpu", {}),
    "spec.resources.cpu": ("4", {}),
    "spec.resources.memory": ("64Gi", {}),
    "spec.resources.sharedMemory": ("8Gi", {}),
    "spec.resources.podSecurityContext": ({"runAsUser": 2000}, {}),
    "spec.resources.securityContext": ({"readOnlyRootFilesystem": True}, {}),
    "spec.resources.podLabels": ({"team": "a"}, {}),
    "spec.resources.podAnnotations": ({"note": "x"}, {}),
    "spec.resources.nodeSelector": ({"pool": "h200"}, {}),
    "spec.resources.tolerations": ([{"key": "gpu", "operator": "Exists"}], {}),
    "spec.resources.affinity": ({"nodeAffinity": {}}, {}),
    "spec.resources.priorityClassName": ("high", {}),
    "spec.resources.env[].name": ([{"name": "B", "value": "1"}], {}),
    "spec.resources.env[].value": ([{"name": "A", "value": "2"}], {}),
    "spec.resources.env[].valueFrom": (
        [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}],
        {},
    ),
    "spec.resources.volumes": ([{"name": "v", "emptyDir": {}}], {}),
    "spec.resources.volumeMounts": (
        [{"name": "v", "mountPath": "/v"}],
        {"spec.resources.volumes": [{"name": "v", "emptyDir": {}}]},
    ),
    "spec.scheduling.queue": ("team-a", {}),
    "spec.scheduling.schedulerName": ("volcano", {}),
    "spec.scheduling.minAvailable": (1, {}),
    "spec.scheduling.topology.jobLevel": ("rack", {"spec.scheduling.queue": "q"}),
    "spec.scheduling.topology.jobPolicy": (
        "Preferred",
        {"spec.scheduling.queue": "q", "spec.scheduling.topology.jobLevel": "rack"},
    ),
    "spec.scheduling.topology.modelParallelLevel": (
        "rack",  # tensor 8 x pipeline 2 over 2 pods of 8: data parallel 1, the group is the job
        {
            "spec.scheduling.queue": "q",
            "spec.resources.nodes": 2,
            "spec.parallelism.tensor": 8,
            "spec.parallelism.pipeline": 2,
        },
    ),
    "spec.runPolicy.activeDeadlineSeconds": (3600, {}),
    "spec.runPolicy.ttlSecondsAfterFinished": (60, {}),
    "spec.runPolicy.suspend": (True, {}),
    "spec.runPolicy.cleanPodPolicy": ("All", {}),
    "spec.runPolicy.collectiveTimeoutSeconds": (120, {}),
    "spec.runPolicy.terminationGracePeriodSeconds": (1200, {}),
    "spec.metrics.enabled": (False, {}),
    "spec.metrics.port": (9500, {}),
    "spec.backend": ("TrainJob", {}),  # a TrainJob instead of the PyTorchJob
    "spec.observability.tensorboard.path": (
        "/ckpt/tb2",
        {
            "spec.checkpoint.path": "/ckpt",
            "spec.checkpoint.volume": {"claimName": "runs"},
            "spec.observability.tensorboard.path": "/ckpt/tb",
        },
    ),
    "spec.models[].name": (_models({"name": "actor"}), TWO),
    "spec.models[].preset": (_models(reference={"preset": "gpt-tiny-moe"}), TWO),
    "spec.models[].weights": (_models(reference={"weights": "/m/other"}), TWO),
    "spec.models[].trainable": (
        _models({"trainable": False, "weights": "/m/p"}, {"trainable": True}),
        TWO,
    ),
    **{
        f"spec.models[].overrides.{name}": (_models({"overrides": {name: value}}), TWO)
        for name, value in OVERRIDES
    },
    "spec.models[].parallelism.tensor": (TENSOR_2["spec.models"], TWO),
    "spec.models[].parallelism.pipeline": (_models({"parallelism": {"pipeline": 2}}), TWO),
    "spec.models[].parallelism.virtualPipeline": (
        _models(
            {"overrides": {"numLayers": 4}, "parallelism": {"pipeline": 2, "virtualPipeline": 2}}
        ),
        STAGES_2,
    ),
    "spec.models[].parallelism.context": (_models({"parallelism": {"context": 2}}), TWO),
    "spec.models[].parallelism.expert": (
        _models({"preset": "gpt-tiny-moe", "parallelism": {"expert": 2}}),
        MOE,
    ),
    "spec.models[].parallelism.expertTensor": (
        _models({"preset": "gpt-tiny-moe", "parallelism": {"expertTensor": 2}}),
        MOE,
    ),
    "spec.models[].parallelism.sequenceParallel": (
        _models({"parallelism": {"tensor": 2, "sequenceParallel": True}}),
        TENSOR_2,
    ),
    "spec.models[].ranks.first": (
        _models({"ranks": {"first": 0, "count": 6}}, {"ranks": {"first": 6, "count": 2}}),
        SLICES,
    ),
    "spec.models[].ranks.count": (
        _models({"ranks": {"first": 0, "count": 2}}, {"ranks": {"first": 2, "count": 6}}),
        SLICES,
    ),
    "spec.recipe.dpo.beta": (0.2, TWO),
    "spec.recipe.dpo.labelSmoothing": (0.1, TWO),
    "spec.recipe.distill.temperature": (2.0, {**TWO, "spec.recipe.kind": "distill"}),
    "spec.recipe.distill.klWeight": (0.5, {**TWO, "spec.recipe.kind": "distill"}),
}
# What must change with a field on the changed side only (to stay valid).
CHANGED_TOO: dict[str, dict[str, Any]] = {"spec.data.type": {"spec.data.paths": [{"prefix": "/a"}]}}
# Fields whose effect is not in the rendered objects, and the test that shows it.
ELSEWHERE: dict[str, str] = {
    "spec.recipe.kind": "tests/unit/test_rules.py::test_bad_shape_is_rejected_with_named_fields",
    "spec.runPolicy.backoffLimit": (
        "tests/unit/test_controller.py::test_restarts_beyond_the_backoff_limit_fail_the_job"
    ),
    "spec.runPolicy.progressDeadlineSeconds": (
        "tests/unit/test_lifecycle.py::test_progress_deadline"
    ),
}
# An env list (and paths) change as a whole: the base has one entry for the item fields.
BASE: dict[str, Any] = {"spec.resources.env": [{"name": "A", "value": "1"}]}


def leaf_fields() -> set[str]:
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def walk(node: dict[str, Any], path: str) -> set[str]:
        props = node.get("properties")
        if props and not node.get("x-kubernetes-preserve-unknown-fields"):
            return set().union(*(walk(v, f"{path}.{k}") for k, v in props.items()))
        items = node.get("items")
        if node.get("type") == "array" and isinstance(items, dict) and items.get("properties"):
            return walk(items, f"{path}[]")
        return {path}

    return walk(spec, "spec")


def test_every_field_is_listed_with_its_effect() -> None:
    listed = set(CHANGES) | set(ELSEWHERE)
    assert leaf_fields() - listed == set(), "new fields: list them here with their effect"
    assert listed - leaf_fields() == set(), "fields that no longer exist"


def _set(body: dict[str, Any], field: str, value: Any) -> None:
    parts = field.removeprefix("spec.").split(".")
    node = body["spec"]
    for part in parts[:-1]:
        node = node.setdefault(part.removesuffix("[]"), {})
    node[parts[-1].removesuffix("[]")] = copy.deepcopy(value)


def _rendered(changes: dict[str, Any]) -> list[dict[str, Any]]:
    body = job_dict()
    body["metadata"]["uid"] = "u"
    for field, value in {**BASE, **changes}.items():
        if field.endswith("[].prefix") or field.endswith("[].weight"):
            field = "spec.data.paths"
        elif field.startswith("spec.resources.env[]"):
            field = "spec.resources.env"
        elif field.startswith("spec.models[]"):  # the whole list of models changes
            field = "spec.models"
        _set(body, field, value)
    job = parse_job(body)
    return render(job, plan(job))


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_changing_a_field_changes_what_is_rendered(field: str) -> None:
    value, both = CHANGES[field]
    changed = {**both, **CHANGED_TOO.get(field, {}), field: value}
    assert _rendered(both) != _rendered(changed), f"{field} changes nothing"


@pytest.mark.parametrize("field", sorted(ELSEWHERE))
def test_the_named_test_exists(field: str) -> None:
    path, _, name = ELSEWHERE[field].partition("::")
    tree = ast.parse((ROOT / path).read_text())
    assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def _config_fields(model: type, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        annotation = info.annotation
        inner = getattr(annotation, "model_fields", None)
        out |= _config_fields(annotation, f"{prefix}{name}.") if inner else {prefix + name}
    return out


def test_the_trainer_reads_every_field_of_its_config() -> None:
    """Each TrainerConfig leaf attribute is read somewhere in the trainer (or its contract
    helpers); an attribute nobody reads is a field that does nothing."""
    code = "\n".join(
        p.read_text()
        for d in ("trainer/kubetron_trainer", "api/kubetron_api")
        for p in (ROOT / d).rglob("*.py")
        if p.name not in ("config.py", "v1alpha1.py")  # the definitions themselves
    )
    unread = sorted(
        f for f in _config_fields(TrainerConfig)
        if not re.search(rf"\.{f.rsplit('.', 1)[-1]}\b", code)
    )  # fmt: skip
    assert unread == [], f"trainer config fields nothing reads: {unread}"
