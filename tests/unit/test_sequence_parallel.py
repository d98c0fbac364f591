"""Sequence parallelism without Transformer Engine, the parts that need no process group: the
local spec's `Norm` in every norm slot (final norm included), its parameters marked for
Megatron's tensor-parallel gradient all-reduce, torch's math and state-dict keys, and the
rules (no TE requirement; refused on the CPU by the operator and by the trainer).

The numbers (TP2 + SP losses equal TP2's) are checked on 2 GPUs in tests/gpu/test_multigpu.py.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from kubetron_api.config import PRESETS, TrainerConfig
from kubetron_api.dims import ParallelConfigError
from kubetron_operator.plan import plan
from kubetron_trainer.__main__ import prepare
from kubetron_trainer.models.norm import Norm
from kubetron_trainer.models.spec import layer_spec
from kubetron_trainer.runtime.topology import Topology
from tests.builders import make_job


def tp2_config(normalization: str = "RMSNorm", sp: bool = True) -> TransformerConfig:
    return TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        normalization=normalization,
        tensor_model_parallel_size=2,
        sequence_parallel=sp,
    )


@pytest.mark.parametrize(
    ("normalization", "reference"),
    [("RMSNorm", torch.nn.RMSNorm), ("LayerNorm", torch.nn.LayerNorm)],
)
@pytest.mark.parametrize("sp", [True, False])
def test_norm_is_torchs_norm_with_marked_parameters(
    normalization: str, reference: type[torch.nn.Module], sp: bool
) -> None:
    norm = Norm(tp2_config(normalization, sp), 64, eps=1e-6)
    ref = reference(64, eps=1e-6)
    assert norm.state_dict().keys() == ref.state_dict().keys()  # checkpoints unchanged
    torch.manual_seed(0)
    with torch.no_grad():
        for p, q in zip(norm.parameters(), ref.parameters(), strict=True):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    x = torch.randn(8, 2, 64)
    assert torch.equal(norm(x), ref(x))
    assert all(p.sequence_parallel is sp for p in norm.parameters())  # type: ignore[attr-defined]


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama3-8b", "gpt-tiny", "qwen3-30b-a3b"])
@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_every_norm_of_the_local_spec_is_norm(preset: str, backend: str) -> None:
    arch = PRESETS[preset]
    spec = layer_spec(arch, backend)  # type: ignore[arg-type]
    layer = spec.layer.submodules
    attention = layer.self_attention.submodules
    assert layer.input_layernorm is Norm and layer.pre_mlp_layernorm is Norm
    qk = [attention.q_layernorm, attention.k_layernorm]
    # q/k norms where the model has them; no norm is added where it has none (llama3)
    assert qk == ([Norm, Norm] if arch.qk_layernorm else [IdentityOp, IdentityOp])
    decoder = spec.decoder(tp2_config(), pp_rank=0, vp_stage=None)
    assert isinstance(decoder, TransformerBlockSubmodules)
    assert decoder.layer_norm is Norm  # the final norm too (Megatron's default refuses SP)
    assert decoder.layer_specs == [spec.layer] * 4


def test_sequence_parallel_needs_no_transformer_engine() -> None:
    p = plan(make_job(tensor=2, sequenceParallel=True))
    assert p.trainer_config.parallelism.sequence_parallel
    assert p.requirements == ()
    assert plan(make_job(context=2, globalBatchSize=4)).requirements == ("transformer-engine",)


def test_trainer_refuses_sequence_parallel_on_cpu_before_joining() -> None:
    # a config the operator would refuse (device cpu), as a trainer started by hand reads it
    job = make_job("gpt-tiny", tensor=2, sequenceParallel=True, gpusPerNode=2, seqLength=64)
    cfg: TrainerConfig = plan(job).trainer_config
    args = argparse.Namespace(fast_path=None, device="cpu")
    with pytest.raises(ParallelConfigError) as info:  # exit code 2
        prepare(cfg, Topology.single_process(), args)
    assert "spec.parallelism.sequenceParallel needs GPUs" in str(info.value)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"precision": "fp8", "fastPath": "off"}, "spec.recipe.precision=fp8"),
        ({"context": 2}, "context=2"),
    ],
)
def test_trainer_without_te_refuses_fp8_and_context_before_joining(
    fields: dict[str, object], named: str
) -> None:
    """No silent bf16 for fp8: without Transformer Engine's spec the trainer exits 2 (config)
    before it joins the job, naming the field and the image to use."""
    job = make_job("gpt-tiny", gpusPerNode=2, seqLength=64, **fields)  # type: ignore[arg-type]
    cfg: TrainerConfig = plan(job).trainer_config
    args = argparse.Namespace(fast_path=None, device="cpu", attention="auto")
    with pytest.raises(ParallelConfigError) as info:
        prepare(cfg, Topology.single_process(), args)
    assert named in str(info.value) and "no Transformer Engine" in str(info.value)
