"""Trainer parts that need no process group: exit codes, config errors, the data layout, the
checkpoint pointer and the metrics a step records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_api.exitcodes import ConfigError, ExitCode, Terminated
from kubetron_trainer.__main__ import load_config
from kubetron_trainer.data.batches import Batches, MockDataset
from kubetron_trainer.observe.metrics import StepStats, TrainerMetrics
from kubetron_trainer.runtime.checkpoint import read_latest, write_latest
from kubetron_trainer.runtime.failures import classify
from kubetron_trainer.runtime.topology import TopologyError


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (ConfigError("recipe.seqLength", "too long"), ExitCode.CONFIG),
        (ParallelConfigError(["tensor=3 ..."], "world=4"), ExitCode.CONFIG),
        (TopologyError(["RANK is not set"]), ExitCode.ENVIRONMENT),
        (Terminated("SIGTERM"), ExitCode.SIGTERM),
        (dist.DistError("watchdog"), ExitCode.COMMUNICATION),
        (RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"), ExitCode.COMMUNICATION),
        (torch.OutOfMemoryError("CUDA out of memory"), ExitCode.OUT_OF_MEMORY),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), ExitCode.GPU_FAULT),
        (ValueError("a bug"), ExitCode.ERROR),
    ],
)
def test_exit_codes_split_permanent_from_retryable(err: BaseException, code: ExitCode) -> None:
    assert classify(err) == code
    assert classify(err).retryable == (code >= 128)


def test_bad_config_error_names_the_camel_case_field(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"numLayers": 2}, "recipe": {"seqLength": 4}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.hiddenSize" in str(err.value) and "recipe.seqLength" in str(err.value)
    with pytest.raises(ConfigError, match="not valid JSON"):
        path.write_text("{")
        load_config(path)


@pytest.mark.parametrize(("gbs", "mbs", "dp"), [(8, 2, 2), (16, 1, 4), (12, 3, 1)])
def test_each_global_batch_is_split_exactly_over_dp_ranks(gbs: int, mbs: int, dp: int) -> None:
    def indices(step: int, rank: int) -> list[int]:
        b = Batches(None, global_batch=gbs, micro_batch=mbs, dp_rank=rank, dp_size=dp, device="cpu")  # type: ignore[arg-type]
        return [i for m in range(b.num_micro_batches) for i in b.indices(step, m)]

    for step in range(3):
        seen = sorted(i for r in range(dp) for i in indices(step, r))
        assert seen == list(range(step * gbs, (step + 1) * gbs))


def test_mock_samples_are_deterministic_and_shifted_by_one() -> None:
    a, b = MockDataset(512, 16, 100, seed=7), MockDataset(512, 16, 100, seed=7)
    assert torch.equal(a[3]["tokens"], b[3]["tokens"])
    assert not torch.equal(a[3]["tokens"], a[4]["tokens"])
    assert torch.equal(a[3]["tokens"][1:], a[3]["labels"][:-1])
    assert int(a[3]["tokens"].max()) < 512


def test_latest_pointer_is_replaced_atomically(tmp_path: Path) -> None:
    assert read_latest(tmp_path) is None
    write_latest(tmp_path, 10)
    write_latest(tmp_path, 20)
    assert read_latest(tmp_path) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(ValueError, match="not a step number"):
        read_latest(tmp_path)


def test_metrics_of_a_step_on_a_private_registry() -> None:
    m = TrainerMetrics("job-a", rank=0, local_rank=0, world_size=4, multiprocess=False)
    stats = StepStats(5, 2.5, 0.7, 1e-4, 0.2, 4096, 20480.0, 1.5, None)
    m.record_step(stats)
    m.record_step(stats)
    reg = m.registry
    assert isinstance(reg, CollectorRegistry)
    job = {"job": "job-a"}
    assert reg.get_sample_value("kubetron_train_step", job) == 5
    assert reg.get_sample_value("kubetron_train_loss", job) == 2.5
    assert reg.get_sample_value("kubetron_train_tokens_total", job) == 2 * 4096 / 4
    assert reg.get_sample_value("kubetron_train_step_duration_seconds_count", job) == 2
    assert reg.get_sample_value("kubetron_train_mfu_ratio", job) is None  # no peak known


def test_metrics_of_other_local_ranks_only_count_tokens() -> None:
    m = TrainerMetrics("job-b", rank=1, local_rank=1, world_size=2, multiprocess=False)
    m.record_step(StepStats(1, 3.0, 1.0, 1e-3, 0.1, 100, 1000.0, 0.1, 0.5))
    assert m.registry is not None
    assert m.registry.get_sample_value("kubetron_train_tokens_total", {"job": "job-b"}) == 50
    assert m.registry.get_sample_value("kubetron_train_step", {"job": "job-b"}) is None


class Wrapper:
    """As Megatron's optimizers hold the torch one: as `.optimizer`."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.optimizer = opt


def test_adam_steps_are_floats_during_a_load_and_tensors_after() -> None:
    from kubetron_trainer.runtime.optim_state import steps_aside_while_loading

    p = torch.nn.Parameter(torch.ones(4))
    trained = torch.optim.AdamW([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(4)
        trained.step()
    saved = trained.state_dict()

    q = torch.nn.Parameter(torch.ones(4))
    fresh = torch.optim.AdamW([q], lr=0.1)
    with steps_aside_while_loading(Wrapper(fresh)):
        fresh.load_state_dict(saved)
        inside = fresh.state[q]["step"]
        # what Megatron's per-key copy sees: only the moments are tensors
        assert not isinstance(inside, torch.Tensor) and inside == 3.0
    step = fresh.state[q]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and float(step) == 3.0
    q.grad = torch.ones(4)
    fresh.step()  # torch Adam accepts the restored state
    assert float(fresh.state[q]["step"]) == 4.0


def _megatron_style_load(
    opt: torch.optim.Optimizer, saved: list[dict[str, torch.Tensor]], step: int
) -> None:
    """What Megatron-Core 0.19's DistributedOptimizer.load_state_dict does without TE or Apex,
    through its own `_set_main_param_and_optimizer_states`: one shared `step` tensor put into
    every parameter's state, torch's load, then a per-key copy of each saved shard."""
    from types import SimpleNamespace

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    shared_step = torch.tensor(float(step))
    empty = [{k: torch.zeros_like(v) for k, v in t.items() if k != "param"} for t in saved]
    groups = opt.state_dict()["param_groups"]
    opt.load_state_dict(
        {
            "state": {i: {**e, "step": shared_step} for i, e in enumerate(empty)},
            "param_groups": groups,
        }
    )
    model_params = [torch.nn.Parameter(torch.zeros(1)) for _ in saved]  # keys, as bf16 params are
    host = SimpleNamespace(
        optimizer=opt,
        config=SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False),
        model_param_group_index_map={m: (0, i) for i, m in enumerate(model_params)},
    )
    with torch.no_grad():  # as in Megatron's checkpoint load
        for model_param, tensors in zip(model_params, saved, strict=True):
            DistributedOptimizer._set_main_param_and_optimizer_states(host, model_param, tensors)


def test_megatron_distributed_optimizer_load_resumes_torch_adam_exactly() -> None:
    """The H100 failure (KeyError 'step') through Megatron's own copy, and the workaround: after
    it the optimizer continues exactly as one that was never interrupted."""
    from kubetron_trainer.runtime.optim_state import steps_aside_while_loading

    def grads(step: int) -> list[torch.Tensor]:
        return [torch.full((4,), 0.1 * step + 0.5), torch.full((3,), 1.0 - 0.2 * step)]

    saved_at = 3
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))]
    trained = torch.optim.AdamW(params, lr=0.1)
    for k in range(saved_at):
        for p, g in zip(params, grads(k), strict=True):
            p.grad = g
        trained.step()
    saved = [
        {
            "param": p.detach().clone(),
            **{k: trained.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")},
        }
        for p in params
    ]

    def fresh() -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
        ps = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
        return ps, torch.optim.AdamW(ps, lr=0.1)

    _, broken = fresh()
    with pytest.raises(KeyError, match="step"):  # Megatron-Core 0.19.2 as it is
        _megatron_style_load(broken, saved, step=saved_at)

    resumed_params, resumed = fresh()
    with steps_aside_while_loading(Wrapper(resumed)):
        _megatron_style_load(resumed, saved, step=saved_at)
    steps = [resumed.state[p]["step"] for p in resumed_params]
    assert steps[0] is not steps[1]  # one tensor each: torch Adam increments them in place
    for k in range(saved_at, saved_at + 3):
        for ps in (params, resumed_params):
            for p, g in zip(ps, grads(k), strict=True):
                p.grad = g.clone()
        trained.step()
        resumed.step()
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("pp", "vpp", "batched"), [(2, 2, False), (4, 2, True), (2, 1, True)])
def test_interleaved_two_stage_pipeline_sends_one_direction_at_a_time(
    pp: int, vpp: int, batched: bool
) -> None:
    """With two stages the previous and the next stage are one peer: a batched isend/irecv
    to it swapped activations and gradients under the interleaved schedule (2 H200s)."""
    from kubetron_api.config import PRESETS, TrainerConfig
    from kubetron_trainer.models.megatron_config import transformer_config

    arch = PRESETS["gpt-tiny"].model_copy(update={"num_layers": 8})
    cfg = TrainerConfig.model_validate(
        {"model": arch.model_dump(), "preset": "gpt-tiny", "worldSize": pp, "gpusPerNode": pp,
         "parallelism": {"pipeline": pp, "virtualPipeline": vpp},
         "recipe": {"precision": "fp32", "seqLength": 64}}
    )  # fmt: skip
    dims = ParallelDims.from_degrees(pp, pp=pp, vpp=vpp)
    config = transformer_config(cfg, dims, torch.device("cpu"))
    assert config.batch_p2p_comm is batched
    assert config.virtual_pipeline_model_parallel_size == (vpp if vpp > 1 else None)


@pytest.mark.parametrize(("layers", "expected"), [(0, None), (3, "full")])
def test_recompute_layers_reach_megatrons_block_recompute(
    layers: int, expected: str | None
) -> None:
    """recipe.recomputeLayers is Megatron's full recompute with the block method: the first N
    layers of each model chunk recompute their activations (runs on GPUs only: the recompute
    saves CUDA RNG states; tests/gpu/test_recompute_gpu.py trains with it)."""
    from kubetron_api.config import PRESETS, TrainerConfig
    from kubetron_trainer.models.megatron_config import transformer_config

    arch = PRESETS["gpt-tiny"].model_copy(update={"num_layers": 8})
    cfg = TrainerConfig.model_validate(
        {"model": arch.model_dump(), "preset": "gpt-tiny", "worldSize": 2, "gpusPerNode": 2,
         "parallelism": {"pipeline": 2}, "recipe": {"seqLength": 64, "recomputeLayers": layers}}
    )  # fmt: skip
    config = transformer_config(cfg, ParallelDims.from_degrees(2, pp=2), torch.device("cpu"))
    assert config.recompute_granularity == expected
    assert (config.recompute_method, config.recompute_num_layers) == (
        ("block", 3) if layers else (None, None)
    )
