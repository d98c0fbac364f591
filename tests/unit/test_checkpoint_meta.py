"""Checkpoint metadata, the refusals before a resume, `kubetron checkpoints`, the data position
and the re-seeding of a resume into another shape; no processes, no torch.distributed.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kubetron_api import ckpt_inspect
from kubetron_api.ckpt_meta import (
    FORMAT,
    MEGATRON_FILES,
    META_FILE,
    RunIdentity,
    describe_shape,
    plan_resume,
    read_step_meta,
    step_dir,
    write_latest,
    write_step_meta,
)
from kubetron_api.config import PRESETS, TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_api.exitcodes import ConfigError
from kubetron_trainer.__main__ import main as trainer_main
from kubetron_trainer.data.batches import Batches
from kubetron_trainer.runtime.seeding import reseed_for_resume, resume_seed, rng_seeds

ROOT = Path(__file__).resolve().parents[2]
GBS = 8


def config(ckpt: Path, **model: int) -> TrainerConfig:
    arch = PRESETS["gpt-tiny"].model_copy(update=model)
    return TrainerConfig.model_validate(
        {
            "model": arch.model_dump(by_alias=True),
            "preset": "gpt-tiny",
            "recipe": {"globalBatchSize": GBS, "microBatchSize": 2, "seqLength": 64},
            "checkpoint": {"path": str(ckpt)},
            "metrics": {"enabled": False},
        }
    )


def identity(world: int = 2, tp: int = 1, padded: int = 512, **model: int) -> RunIdentity:
    dims = ParallelDims.from_degrees(world, tp=tp)
    return RunIdentity.from_config(config(Path("/unused"), **model), dims, padded)


def fake_save(root: Path, step: int, run: RunIdentity, *, latest: bool = True) -> Path:
    """What a finished save leaves: Megatron's metadata files, kubetron.json, `latest`."""
    target = step_dir(root, step)
    target.mkdir(parents=True)
    for name in MEGATRON_FILES:
        (target / name).write_text("{}")
    (target / "__0_0.distcp").write_bytes(b"shards")
    write_step_meta(target, run.step_meta(step, step * GBS))
    if latest:
        write_latest(root, step)
    return target


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def refuse(root: Path, run: RunIdentity, field: str, *needles: str) -> str:
    """plan_resume raises ConfigError naming `field`; nothing under `root` changed."""
    before = tree_hash(root)
    with pytest.raises(ConfigError) as err:
        plan_resume(root, run)
    assert err.value.field == field
    for needle in needles:
        assert needle in str(err.value)
    assert "nothing was loaded or changed" in str(err.value)
    assert tree_hash(root) == before
    return str(err.value)


# --------------------------------------------------------------------------- plan_resume


def test_no_latest_starts_from_step_0(tmp_path: Path) -> None:
    assert plan_resume(tmp_path / "missing", identity()) is None
    fake_save(tmp_path, 10, identity(), latest=False)  # a directory alone is not a checkpoint
    assert plan_resume(tmp_path, identity()) is None


def test_same_shape_restores_rng_and_another_reseeds(tmp_path: Path) -> None:
    fake_save(tmp_path, 4, identity(world=2))
    same = plan_resume(tmp_path, identity(world=2))
    assert same is not None and same.restore_rng and same.step == 4
    assert same.consumed_samples == 4 * GBS
    assert same.saved is not None and same.saved.shape == ParallelDims(world_size=2, dp=2)
    for other in (identity(world=4), identity(world=2, tp=2), identity(world=4, tp=2)):
        plan = plan_resume(tmp_path, other)
        assert plan is not None and not plan.restore_rng and plan.step == 4
        assert "RNG re-seeded (shape changed)" in plan.why
        assert plan.consumed_samples == 4 * GBS


def test_metadata_round_trip_and_format(tmp_path: Path) -> None:
    target = fake_save(tmp_path, 6, identity(world=4, tp=2))
    raw = json.loads((target / META_FILE).read_text())
    assert raw["format"] == FORMAT == 1
    assert raw["shape"] == {
        "worldSize": 4, "tensor": 2, "pipeline": 1, "virtualPipeline": 1, "context": 1,
        "expert": 1, "expertTensor": 1, "data": 2,
    }  # fmt: skip
    assert raw["model"]["preset"] == "gpt-tiny" and raw["model"]["arch"]["numLayers"] == 2
    assert raw["consumedSamples"] == 48 and raw["step"] == 6 and raw["savedAt"].endswith("Z")
    meta = read_step_meta(target)
    assert describe_shape(meta.shape) == "TP2 x DP2 (world 4)"
    assert meta.model.describe() == "gpt-tiny (2 layers, hidden 64, vocab 512)"


def test_another_architecture_is_refused(tmp_path: Path) -> None:
    fake_save(tmp_path, 4, identity())
    message = refuse(
        tmp_path, identity(num_layers=4, hidden_size=128), "model",
        "numLayers: checkpoint 2, this job 4", "hiddenSize: checkpoint 64, this job 128",
        "set checkpoint.path to a new directory",
    )  # fmt: skip
    assert str(step_dir(tmp_path, 4)) in message
    refuse(tmp_path, identity(vocab_size=1024), "model", "vocabSize: checkpoint 512")


def test_another_vocabulary_padding_is_refused(tmp_path: Path) -> None:
    fake_save(tmp_path, 4, identity(padded=512))
    refuse(tmp_path, identity(tp=2, padded=768), "parallelism.tensor", "to 512 rows")


def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    target = fake_save(tmp_path, 4, identity())
    raw = json.loads((target / META_FILE).read_text())
    (target / META_FILE).write_text(json.dumps(raw | {"format": FORMAT + 1, "new": {}}))
    refuse(
        tmp_path, identity(), "checkpoint.path",
        f"newer kubetron (checkpoint format {FORMAT + 1}; this trainer reads formats up to 1)",
    )  # fmt: skip


@pytest.mark.parametrize("damage", ["no directory", "no kubetron.json", "no .metadata"])
def test_latest_pointing_to_an_incomplete_save_is_refused(tmp_path: Path, damage: str) -> None:
    fake_save(tmp_path, 2, identity())
    target = fake_save(tmp_path, 4, identity())
    if damage == "no directory":
        for path in target.iterdir():
            path.unlink()
        target.rmdir()
    elif damage == "no kubetron.json":  # interrupted after the shards, before the metadata
        (target / META_FILE).unlink()
        (target / ".metadata").unlink()
    else:
        (target / ".metadata").unlink()
    refuse(
        tmp_path, identity(), "checkpoint.path",
        "latest points to step 4, but that save is incomplete", "complete steps: 2",
    )  # fmt: skip


def test_a_latest_that_is_not_a_step_is_refused(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(ConfigError, match="not a step number") as err:
        plan_resume(tmp_path, identity())
    assert err.value.field == "checkpoint.path"


def test_a_legacy_checkpoint_loads_unchecked_and_reseeds(tmp_path: Path) -> None:
    target = fake_save(tmp_path, 4, identity())
    (target / META_FILE).unlink()  # written before format 1: Megatron's files only
    plan = plan_resume(tmp_path, identity(num_layers=3))
    assert plan is not None and plan.saved is None and not plan.restore_rng
    assert plan.consumed_samples == 4 * GBS


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("newer format", "config field checkpoint.path: {target} was written by a newer"),
        ("incomplete latest", "config field checkpoint.path: {root}/latest points to step 4"),
        ("architecture", "config field model: {target} holds another architecture"),
    ],
)
def test_the_trainer_refuses_before_joining_and_exits_2(
    tmp_path: Path, case: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "ckpt"
    target = fake_save(root, 4, identity(world=1))
    if case == "newer format":
        raw = json.loads((target / META_FILE).read_text())
        (target / META_FILE).write_text(json.dumps(raw | {"format": 99}))
    elif case == "incomplete latest":
        (target / META_FILE).unlink()
        (target / ".metadata").unlink()
    path = tmp_path / "config.json"
    layers = 3 if case == "architecture" else 2
    path.write_text(config(root, num_layers=layers).model_dump_json(by_alias=True))
    before = tree_hash(root)
    assert trainer_main(["--config", str(path), "--device", "cpu"]) == 2
    assert message.format(root=root, target=target) in caplog.text
    assert "exiting 2 (not retryable)" in caplog.text
    assert tree_hash(root) == before


# --------------------------------------------------------------------------- inspect


def test_inspect_lists_steps_state_model_and_shape(tmp_path: Path) -> None:
    fake_save(tmp_path, 2, identity(world=2))
    fake_save(tmp_path, 4, identity(world=4, tp=2))
    interrupted = fake_save(tmp_path, 6, identity(world=4), latest=False)
    (interrupted / META_FILE).unlink()  # interrupted while writing shards
    (interrupted / ".metadata").unlink()
    legacy = fake_save(tmp_path, 8, identity(), latest=False)
    (legacy / META_FILE).unlink()
    report = ckpt_inspect.inspect(tmp_path)
    assert report.latest == 4 and report.resumable
    states = {s.step: (s.complete, s.legacy) for s in report.steps}
    assert states == {2: (True, False), 4: (True, False), 6: (False, False), 8: (True, True)}
    text = ckpt_inspect.to_text(report)
    assert "latest: step 4 (a run resumes from it)" in text
    rows = {line.split()[0]: line for line in text.splitlines()[2:7]}
    assert "complete" in rows["2"] and "DP2 (world 2)" in rows["2"] and "16" in rows["2"]
    assert "TP2 x DP2 (world 4)" in rows["4"] and "gpt-tiny (2 layers" in rows["4"]
    assert "incomplete" in rows["6"] and "complete (legacy)" in rows["8"]
    assert "step 6: no kubetron.json and no .metadata" in text
    doc = ckpt_inspect.to_json(report)
    assert doc["latest"] == 4 and [s["step"] for s in doc["steps"]] == [2, 4, 6, 8]
    assert doc["steps"][1]["metadata"]["shape"]["tensor"] == 2


def test_inspect_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ckpt_inspect.main([str(tmp_path / "missing")]) == 2
    fake_save(tmp_path, 2, identity())
    assert ckpt_inspect.main([str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumable"] is True
    write_latest(tmp_path, 4)  # points to a step that was never written
    assert ckpt_inspect.main([str(tmp_path)]) == 1
    assert "latest: step 4: NOT RESUMABLE, points to an incomplete save" in capsys.readouterr().out


def test_inspect_runs_without_torch(tmp_path: Path) -> None:
    fake_save(tmp_path, 2, identity())
    code = (
        "import sys; from kubetron_api import ckpt_inspect; "
        f"rc = ckpt_inspect.main([{str(tmp_path)!r}]); "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'numpy')]; "
        "assert not heavy, heavy; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "trainer", capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "DP2 (world 2)" in proc.stdout


# --------------------------------------------------------------------------- data position


def batches(dp: int, rank: int, gbs: int = GBS, **start: int) -> Batches:
    return Batches(
        None, global_batch=gbs, micro_batch=2, dp_rank=rank, dp_size=dp, device="cpu", **start
    )  # type: ignore[arg-type]


def step_samples(dp: int, step: int, gbs: int = GBS, **start: int) -> list[list[int]]:
    """Per dp rank, the samples of one step."""
    out = []
    for rank in range(dp):
        b = batches(dp, rank, gbs, **start)
        out.append([i for m in range(b.num_micro_batches) for i in b.indices(step, m)])
    return out


def test_a_resume_in_another_dp_size_reads_what_an_uninterrupted_run_reads() -> None:
    for dp_old, dp_new in [(2, 4), (4, 2), (1, 4)]:
        start = {"start_step": 3, "start_sample": batches(dp_old, 0).consumed(3)}
        assert start["start_sample"] == 3 * GBS
        for step in range(3, 6):
            assert step_samples(dp_new, step, **start) == step_samples(dp_new, step)
            union = sorted(i for rank in step_samples(dp_new, step, **start) for i in rank)
            assert union == sorted(i for rank in step_samples(dp_old, step) for i in rank)


def test_the_data_position_is_the_consumed_samples_also_with_another_global_batch() -> None:
    # 3 steps of 8 samples, then global batch 16: continues at sample 24, no gap, no repeat
    resumed = batches(2, 0, gbs=16, start_step=3, start_sample=24)
    assert resumed.consumed(3) == 24 and resumed.consumed(5) == 56
    seen = sorted(
        i for rank in step_samples(2, 3, gbs=16, start_step=3, start_sample=24) for i in rank
    )
    assert seen == list(range(24, 40))


# --------------------------------------------------------------------------- re-seeding


def fake_pg(pp: int = 0, tp: int = 0, dp: int = 0) -> SimpleNamespace:
    def group(rank: int) -> SimpleNamespace:
        return SimpleNamespace(rank=lambda: rank)

    return SimpleNamespace(pp=group(pp), tp=group(tp), ep=group(0), expt_tp=group(0), dp=group(dp))


@pytest.fixture
def rng_kept() -> Iterator[None]:
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def test_resume_seed_is_deterministic_and_in_range() -> None:
    seeds = {resume_seed(seed, step) for seed in (1, 1234) for step in (0, 1, 2, 10_000)}
    assert len(seeds) == 8 and all(1 <= s < 2**31 for s in seeds)
    assert resume_seed(1234, 4) == resume_seed(1234, 4)


@pytest.mark.usefixtures("rng_kept")
def test_reseed_follows_megatron_offsets_from_seed_and_step() -> None:
    def draw(pg: SimpleNamespace, step: int = 4) -> tuple[int, float, float]:
        seeds = reseed_for_resume(pg, 1234, step)  # type: ignore[arg-type]
        return seeds.base, float(torch.rand(1)), float(np.random.rand())

    base = resume_seed(1234, 4)
    assert draw(fake_pg())[0] == rng_seeds(base, pp_rank=0, tp_rank=0, ep_rank=0, etp_rank=0).base
    assert draw(fake_pg()) == draw(fake_pg())  # deterministic
    assert draw(fake_pg(tp=1)) == draw(fake_pg(tp=0))  # tensor-parallel peers share it
    assert draw(fake_pg(dp=3)) == draw(fake_pg(dp=0))  # as Megatron without dp-random-init
    assert draw(fake_pg(pp=1)) != draw(fake_pg(pp=0))  # pipeline stages do not
    assert draw(fake_pg(), step=5) != draw(fake_pg(), step=4)


def test_kubetron_cli_lists_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetron_operator.cli import main

    assert main(["checkpoints", str(tmp_path / "missing")]) == 2
    assert main(["checkpoints", str(tmp_path), "--json"]) == 0  # no `latest`: a fresh start
    assert capsys.readouterr().out.strip()


def test_an_older_attempt_of_the_same_job_is_fenced_out(tmp_path: Path) -> None:
    from kubetron_api.ckpt_meta import Attempt, check_fence, claim, read_fence

    root = tmp_path / "ckpt"
    assert Attempt.from_env({}) is None  # outside the operator: no fencing
    first = Attempt.from_env({"KUBETRON_JOB_UID": "u1", "KUBETRON_ATTEMPT": "1"})
    second = Attempt("u1", 2)
    claim(root, first)
    assert read_fence(root) == first
    claim(root, second)  # the next attempt takes over
    with pytest.raises(ConfigError, match="belongs to attempt 2 of this job; this pod is of "
                       "attempt 1, which the operator replaced"):  # fmt: skip
        check_fence(root, first)
    with pytest.raises(ConfigError):
        claim(root, first)  # a zombie cannot take it back
    assert read_fence(root) == second
    check_fence(root, second)
    check_fence(root, None)
    claim(root, Attempt("u2", 1))  # another job (re-created with the same volume) owns it now
    assert read_fence(root) == Attempt("u2", 1)


def test_checkpoints_from_python_313_load_in_older_pythons(tmp_path: Path) -> None:
    """Torch DCP pickles the checkpoint directory into .metadata; Python 3.13 writes a Path as
    `pathlib._local.PosixPath`. The trainer package makes that loadable (found when a checkpoint
    written in the 3.13 trainer image was exported on 3.12), and its writer records a string."""
    import pickle

    import kubetron_trainer  # noqa: F401  (the alias)
    from kubetron_trainer.runtime.checkpoint import PortableWriter

    as_313 = pickle.dumps(Path("/ckpt/iter_0000010"), protocol=0).replace(
        b"cpathlib\n", b"cpathlib._local\n"
    )
    assert b"pathlib._local" in as_313
    assert pickle.loads(as_313) == Path("/ckpt/iter_0000010")
    if sys.version_info < (3, 13):
        assert sys.modules["pathlib._local"] is sys.modules["pathlib"]
    meta = PortableWriter(str(tmp_path)).storage_meta()
    assert meta is not None and meta.checkpoint_id == str(tmp_path)
    assert type(meta.checkpoint_id) is str


# --------------------------------------------------------------------------- several models

FIELD = "spec.models[1].weights"


def multi_model_dir(root: Path) -> Path:
    """A multi-model job's checkpoints: `policy` saved twice, `critic` interrupted."""
    fake_save(root / "policy", 2, identity())
    fake_save(root / "policy", 4, identity(world=4, tp=2))
    fake_save(root / "critic", 2, identity(world=1))
    write_latest(root / "critic", 6)  # points to a save that never finished
    return root


def test_inspect_lists_each_model_of_a_job_of_several_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetron_operator.cli import main

    root = multi_model_dir(tmp_path / "ckpt")
    assert main(["checkpoints", str(root)]) == 1  # critic's `latest` would be refused
    text = capsys.readouterr().out
    assert text.startswith(f"checkpoint directory {root}: one directory per trained model\n")
    critic, policy = text.split("\nmodel ")[1:]
    assert critic.startswith("critic\n") and policy.startswith("policy\n")
    assert "latest: step 6: NOT RESUMABLE, points to an incomplete save" in critic
    assert "latest: step 4 (a run resumes from it)" in policy
    assert "TP2 x DP2 (world 4)" in policy and "gpt-tiny (2 layers" in policy
    assert main(["checkpoints", str(root), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert sorted(doc["models"]) == ["critic", "policy"] and doc["resumable"] is False
    assert [s["step"] for s in doc["models"]["policy"]["steps"]] == [2, 4]
    write_latest(root / "critic", 2)
    assert ckpt_inspect.main([str(root)]) == 0
    assert ckpt_inspect.main([str(root / "policy")]) == 0  # one model's directory, as before
    assert capsys.readouterr().out.count("checkpoint directory") == 3 + 1


def test_a_model_is_picked_from_a_job_of_several_models(tmp_path: Path) -> None:
    from kubetron_api.ckpt_meta import model_dirs, pick_model_dir

    root = multi_model_dir(tmp_path / "ckpt")
    assert list(model_dirs(root)) == ["critic", "policy"]
    assert model_dirs(root / "policy") == {} and model_dirs(tmp_path / "missing") == {}
    assert pick_model_dir(root, "policy", "--model") == root / "policy"
    assert pick_model_dir(root / "policy", None, "--model") == root / "policy"
    refusals = {
        None: "holds the checkpoints of several models (critic, policy); pick one: pass "
        "--model critic",
        "actor": "has no model 'actor' (its models: critic, policy)",
    }
    for name, message in refusals.items():
        with pytest.raises(ConfigError, match=r"config field --model: ") as err:
            pick_model_dir(root, name, "--model")
        assert message in str(err.value)
    with pytest.raises(ConfigError, match="it is one model's checkpoint directory; leave --model"):
        pick_model_dir(root / "policy", "policy", "--model")


def test_export_refuses_a_job_of_several_models_without_a_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kubetron_trainer.tools.export import main as export_main

    root = multi_model_dir(tmp_path / "ckpt")
    assert export_main([str(root), str(tmp_path / "out")]) == 2
    assert "pass --model critic" in caplog.text
    assert export_main([str(root), str(tmp_path / "out"), "--model", "actor"]) == 2
    assert "has no model 'actor' (its models: critic, policy)" in caplog.text
    assert not (tmp_path / "out").exists()


def check_kubetron_weights(root: Path, field: str = FIELD, **model: int) -> str:
    from kubetron_api.hf_config import check_model_weights

    arch = PRESETS["gpt-tiny"].model_copy(update=model)
    return check_model_weights(arch, "gpt-tiny", root, field)


def test_weights_from_a_kubetron_checkpoint_are_checked_against_the_model(tmp_path: Path) -> None:
    root = multi_model_dir(tmp_path / "ckpt")
    assert check_kubetron_weights(root / "policy") == "kubetron"
    with pytest.raises(ConfigError) as err:
        check_kubetron_weights(root / "policy", num_layers=3)
    assert err.value.field == FIELD
    assert (
        f"step 4 of {root / 'policy'} holds gpt-tiny (2 layers, hidden 64, vocab 512), another "
        "architecture than the model (preset gpt-tiny with its overrides): numLayers: "
        "checkpoint 2, the model 3; pick the preset and spec.models[1].overrides of that "
        "checkpoint"
    ) in str(err.value)
    with pytest.raises(ConfigError, match=r"holds the checkpoints of a job with several models "
                       r"\(critic, policy\); name one model's directory, e\.g\. "):  # fmt: skip
        check_kubetron_weights(root)
    # one model's finetune (spec.model.weights) reads Hugging Face weights only, as before
    with pytest.raises(ConfigError, match=r"spec\.model\.weights: preset gpt-tiny has "
                       "learned_absolute positions"):  # fmt: skip
        check_kubetron_weights(root / "policy", "spec.model.weights")


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("no latest", "but it has no latest (no save of it finished)"),
        ("incomplete", "but latest points to step 6, an incomplete save (iter_0000006/ does not"),
        ("not a number", "but its latest holds no step number"),
        ("legacy", "but step 2 has no kubetron.json (written before checkpoint format 1): its "),
        ("newer", "but step 2 was written by a newer kubetron (checkpoint format 99 is newer"),
    ],
)
def test_weights_from_a_checkpoint_that_cannot_start_a_model_are_refused(
    tmp_path: Path, case: str, why: str
) -> None:
    root = tmp_path / "policy"
    target = fake_save(root, 2, identity(), latest=case != "no latest")
    if case == "incomplete":
        write_latest(root, 6)
    elif case == "not a number":
        (root / "latest").write_text("two\n")
    elif case == "legacy":
        (target / META_FILE).unlink()
    elif case == "newer":
        raw = json.loads((target / META_FILE).read_text())
        (target / META_FILE).write_text(json.dumps(raw | {"format": 99}))
    with pytest.raises(ConfigError) as err:
        check_kubetron_weights(root)
    assert str(err.value).startswith(
        f"config field {FIELD}: {root} is a kubetron checkpoint directory, {why}"
    ), str(err.value)
    assert f"Write the step of a complete save into {root}/latest" in str(err.value)
