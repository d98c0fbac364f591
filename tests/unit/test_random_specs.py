"""Hypothesis over random specs: every spec gives a valid plan or a named error, never a crash."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kubetron_api.config import PRESETS
from kubetron_api.parse import SpecError, parse_job
from kubetron_operator.plan import PlanError, plan
from kubetron_operator.render import render

degree = st.sampled_from([0, 1, 2, 3, 4, 8, 16])
specs = st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries({"preset": st.sampled_from(sorted(PRESETS))}),
        "recipe": st.fixed_dictionaries(
            {
                "globalBatchSize": st.integers(1, 512),
                "microBatchSize": st.integers(1, 8),
                "seqLength": st.sampled_from([64, 512, 1000, 4096, 8192]),
                "precision": st.sampled_from(["bf16", "fp8", "fp32", "fp16"]),
            }
        ),
        "parallelism": st.fixed_dictionaries(
            {
                "tensor": degree,
                "pipeline": degree,
                "virtualPipeline": st.sampled_from([1, 2, 3]),
                "context": st.sampled_from([1, 2, 4]),
                "expert": degree,
                "expertTensor": st.sampled_from([1, 2]),
            }
        ),
        "resources": st.fixed_dictionaries(
            {
                "nodes": st.integers(1, 16),
                "gpusPerNode": st.sampled_from([1, 2, 4, 6, 8]),
                "device": st.sampled_from(["gpu", "cpu"]),
            }
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(spec=specs)
def test_random_spec_plans_or_fails_with_named_fields(spec: dict[str, object]) -> None:
    obj = {"apiVersion": "kubetron.io/v1alpha1", "kind": "MegatronJob", "spec": spec}
    obj["metadata"] = {"name": "r", "uid": "u"}
    try:
        job = parse_job(obj)
        p = plan(job)
    except SpecError as err:
        assert err.problems and all(msg.startswith("spec.") for msg in err.problems)
        return
    except PlanError as err:
        assert err.problems and all("spec." in msg or "model " in msg for msg in err.problems)
        return
    d = p.dims
    assert d.tp * d.cp * d.pp * d.dp == job.spec.resources.world_size
    assert job.spec.recipe.global_batch_size % (job.spec.recipe.micro_batch_size * d.dp) == 0
    assert [o["kind"] for o in render(job, p)] == ["ConfigMap", "PyTorchJob"]
