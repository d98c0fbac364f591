"""recipe.eval: its schema and defaults, the rules that refuse an evaluation that cannot run, the
validation split of each data type (disjoint from the train split, each dp rank its own samples
without repeats), and the validation loss on its way to status.progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from pydantic import ValidationError

from kubetron_api.config import EvalSpec, RecipeSpec, TrainerConfig
from kubetron_api.exitcodes import ConfigError
from kubetron_api.parse import parse_job
from kubetron_operator.cli.crd import crd
from kubetron_operator.plan import PlanError, plan
from kubetron_operator.progress import parse, progress
from kubetron_operator.render import config_json
from kubetron_trainer.data.batches import (
    Batches,
    MockDataset,
    build_data,
    check_indexed_data,
    split_indices,
)
from kubetron_trainer.data.packing import ChatDataset, split_documents, train_documents
from kubetron_trainer.data.pairs import write_marker
from kubetron_trainer.data.preference import PreferenceDataset
from kubetron_trainer.observe.metrics import TrainerMetrics
from kubetron_trainer.tools.indexed import IndexedWriter
from tests.builders import job_dict
from tests.unit.test_multi_model_spec import DPO, multi_model_job, set_field


def tiny_job(recipe: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> Any:
    body = job_dict("gpt-tiny", seqLength=64)
    body["spec"]["recipe"] |= recipe or {}
    body["spec"]["data"] = data or {}
    return parse_job(body)


# --------------------------------------------------------------------------- schema


def test_eval_is_off_unless_set_and_its_bounds_are_the_schemas() -> None:
    assert RecipeSpec().eval is None
    spec = RecipeSpec.model_validate({"eval": {}}).eval
    assert spec == EvalSpec() and (spec.interval, spec.iterations, spec.at_end) == (None, 10, True)
    for bad in ({"iterations": 0}, {"interval": 0}):
        with pytest.raises(ValidationError):
            EvalSpec.model_validate(bad)
    recipe = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    schema = recipe["properties"]["recipe"]["properties"]["eval"]
    assert "default" not in schema  # an absent eval stays absent: a default {} would turn it on
    assert schema["properties"]["iterations"]["minimum"] == 1
    assert schema["properties"]["interval"]["minimum"] == 1


def test_kubectl_wide_shows_the_validation_loss() -> None:
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    [column] = [c for c in columns if c["jsonPath"] == ".status.progress.validationLoss"]
    assert column["priority"] == 1  # -o wide


def test_the_config_map_holds_eval_only_when_set() -> None:
    without = json.loads(config_json(plan(tiny_job()).trainer_config))
    assert "eval" not in without["recipe"]
    spec = {"interval": 5, "iterations": 2}
    within = json.loads(config_json(plan(tiny_job({"eval": spec})).trainer_config))
    assert within["recipe"]["eval"] == {"interval": 5, "iterations": 2, "atEnd": True}
    assert TrainerConfig.model_validate(within).recipe.eval == EvalSpec(**spec)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("recipe", "data", "fragment"),
    [
        (
            {"eval": {}},
            {"split": "99,0,1"},
            "spec.data.split=99,0,1 has no validation part but spec.recipe.eval is set; give the "
            "second weight a share (e.g. 98,2,0) or remove spec.recipe.eval",
        ),
        ({"eval": {}}, {"split": "1,0.0,0"}, "spec.data.split=1,0.0,0 has no validation part"),
        (
            {"eval": {"atEnd": False}},
            {},
            "spec.recipe.eval never evaluates: set its interval, or leave atEnd true",
        ),
    ],
    ids=["no-validation-weight", "zero-as-decimal", "never"],
)
def test_an_evaluation_that_cannot_run_is_refused(
    recipe: dict[str, Any], data: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(PlanError) as info:
        plan(tiny_job(recipe, data))
    assert any(fragment in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    ("recipe", "data"),
    [
        ({"eval": {}}, {}),
        ({"eval": {"interval": 5, "atEnd": False}}, {"split": "99.5,0.5,0"}),
        ({}, {"split": "1,0,0"}),  # no eval: no validation part needed
    ],
)
def test_an_evaluation_that_can_run_is_accepted(
    recipe: dict[str, Any], data: dict[str, Any]
) -> None:
    plan(tiny_job(recipe, data))


def test_eval_of_a_multi_model_recipe_is_refused() -> None:
    with pytest.raises(PlanError) as info:
        plan(parse_job(multi_model_job(DPO, set_field("recipe.eval", {}))))
    assert any(
        "spec.recipe.eval scores the language-model loss of recipe.kind pretrain and finetune; "
        "spec.recipe.kind=dpo is not evaluated" in p
        for p in info.value.problems
    ), info.value.problems


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("split", ["99,1,0", "98,2,0", "1,1,1", "90,5,5", "99.5,0.5,0", "1,0,0"])
@pytest.mark.parametrize("count", [1, 2, 3, 7, 160, 1001])
def test_split_parts_are_consecutive_and_the_train_part_is_unchanged(
    split: str, count: int
) -> None:
    parts = [split_documents(count, split, p) for p in range(3)]
    assert [d for part in parts for d in part] == list(range(count))  # a partition, in order
    assert len(parts[0]) == train_documents(count, split)
    assert round(count * float(split.split(",")[0]) / sum(map(float, split.split(",")))) == len(
        parts[0]
    )


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_each_dp_rank_reads_its_own_validation_samples(dp: int) -> None:
    recipe = RecipeSpec(
        train_iters=5, global_batch_size=8, micro_batch_size=2, eval=EvalSpec(iterations=3)
    )
    ranks = [split_indices(recipe, r, dp) for r in range(dp)]
    validation = [i for r in ranks for i in r.validation]
    assert sorted(validation) == list(range(3 * 8))  # every sample once, none twice
    train = [i for r in ranks for i in r.train]
    assert sorted(train) == list(range(5 * 8))
    for r, indices in enumerate(ranks):  # what Batches reads, micro-batch by micro-batch
        batches = Batches(
            None, global_batch=8, micro_batch=2, dp_rank=r, dp_size=dp, device=torch.device("cpu")
        )
        read = [i for k in range(3) for m in range(batches.num_micro_batches)
                for i in batches.indices(k, m)]  # fmt: skip
        assert indices.validation == read
    assert split_indices(RecipeSpec(train_iters=1), 0, 1).validation == []


def write_documents(prefix: Path, lengths: list[int], pairs: bool = False) -> None:
    """Documents whose every token is the document's number (plus one), loss mask 1."""
    with IndexedWriter(prefix, 512, loss_mask=True) as out:
        tokens = np.concatenate([np.full(n, d + 1) for d, n in enumerate(lengths)])
        out.add(tokens, lengths, np.ones(len(tokens), dtype=np.uint8))
        out.commit()
    if pairs:
        write_marker(prefix, len(lengths) // 2)


def test_chat_validation_samples_hold_only_the_documents_after_the_train_part(
    tmp_path: Path,
) -> None:
    lengths = [int(n) for n in np.random.default_rng(0).integers(3, 12, size=50)]
    prefix = tmp_path / "chat"
    write_documents(prefix, lengths)
    common = {"seq_length": 24, "seed": 1, "split": "80,20,0", "pad": 0}
    train = ChatDataset(str(prefix), num_samples=20, **common)  # type: ignore[arg-type]
    valid = ChatDataset(str(prefix), num_samples=30, part=1, **common)  # type: ignore[arg-type]
    seen = {p: {int(d) for i in range(len(ds)) for d in ds.documents(i)}
            for p, ds in ((0, train), (1, valid))}  # fmt: skip
    assert seen == {0: set(range(40)), 1: set(range(40, 50))}
    for i in range(len(valid)):  # the tokens are those documents' own
        sample, docs = valid.sample(i), valid.documents(i)
        kept = sample.tokens[sample.document_ids >= 0]
        assert set(kept.tolist()) == {int(d) + 1 for d in docs}


def test_preference_validation_pairs_follow_the_train_pairs(tmp_path: Path) -> None:
    prefix = tmp_path / "pairs"
    write_documents(prefix, [5] * 40, pairs=True)  # 20 pairs
    common = {"seq_length": 8, "seed": 1, "split": "3,1,0", "pad": 0}
    valid = PreferenceDataset(str(prefix), num_samples=10, part=1, **common)  # type: ignore[arg-type]
    firsts = {int(valid[i]["tokens"][0, 0]) - 1 for i in range(len(valid))}  # chosen docs
    assert firsts == {2 * p for p in range(15, 20)}
    train = PreferenceDataset(str(prefix), num_samples=15, **common)  # type: ignore[arg-type]
    assert {int(train[i]["tokens"][0, 0]) - 1 for i in range(15)} == {2 * p for p in range(15)}


def test_indexed_validation_samples_are_megatrons_second_share(tmp_path: Path) -> None:
    prefix = tmp_path / "corpus"
    with IndexedWriter(prefix, 512) as out:  # document d: 20 tokens d + 1
        out.add(np.repeat(np.arange(1, 51), 20), [20] * 50)
        out.commit()
    body = job_dict("gpt-tiny", seqLength=16, globalBatchSize=8, trainIters=3)
    body["spec"]["recipe"]["eval"] = {"iterations": 2}
    body["spec"]["data"] = {"type": "indexed", "paths": [{"prefix": str(prefix)}],
                            "split": "80,20,0"}  # fmt: skip
    cfg = plan(parse_job(body)).trainer_config
    data = build_data(cfg, reads_data=True, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    assert data.validation is not None and data.validation.source is not None
    assert len(data.validation.source) >= 2 * 8
    tokens = {
        t: {int(x) for i in range(len(b.source)) for x in b.source[i]["tokens"]}  # type: ignore[index, arg-type]
        for t, b in (("train", data.train), ("validation", data.validation))
    }
    assert tokens["validation"] <= set(range(41, 51))  # documents 40..49: 80,20 of 50
    assert tokens["train"] <= set(range(1, 41))


@pytest.mark.parametrize(("split", "part"), [("99,1,0", "validation"), ("98,1,1", "test")])
def test_a_split_part_with_no_sequence_is_refused_naming_it(
    tmp_path: Path, split: str, part: str
) -> None:
    """50 sequences: 1% of them rounds to none, and Megatron-Core would loop for ever building
    that part; a weight of 0 builds no part and is fine."""
    prefix = tmp_path / "corpus"
    with IndexedWriter(prefix, 512) as out:
        out.add(np.repeat(np.arange(1, 51), 20), [20] * 50)
        out.commit()
    body = job_dict("gpt-tiny", seqLength=16, globalBatchSize=8, trainIters=3)
    body["spec"]["data"] = {"type": "indexed", "paths": [{"prefix": str(prefix)}], "split": split}
    cfg = plan(parse_job(body)).trainer_config
    with pytest.raises(ConfigError, match=rf"data.split: {split} gives the {part} part none of "
                       rf"the 50 sequences of data.paths\[0\]"):  # fmt: skip
        check_indexed_data(cfg)
    data = cfg.data.model_copy(update={"split": "100,0,0"})
    check_indexed_data(cfg.model_copy(update={"data": data}))


def test_mock_validation_is_a_stream_of_its_own() -> None:
    train, valid = MockDataset(512, 16, 8, seed=3), MockDataset(512, 16, 8, seed=3, part=1)
    assert train.entropy(5) == [3, 5]  # the train stream as it always was
    assert all(not np.array_equal(train.sequence(i), valid.sequence(i)) for i in range(8))


def test_build_data_reads_a_validation_split_only_with_eval() -> None:
    cfg = plan(tiny_job()).trainer_config
    kw: dict[str, Any] = {"reads_data": True, "dp_rank": 1, "dp_size": 2}
    assert build_data(cfg, device=torch.device("cpu"), **kw).validation is None
    cfg = plan(tiny_job({"eval": {"iterations": 2}})).trainer_config
    data = build_data(cfg, device=torch.device("cpu"), **kw)
    assert data.validation is not None and data.validation.source is not None
    assert len(data.validation.source) == 2 * cfg.recipe.global_batch_size
    first = data.validation.step(0)[0]
    assert first is not None
    expected = MockDataset(cfg.model.vocab_size, 64, 1, cfg.recipe.seed, part=1)[1]["tokens"]
    assert torch.equal(first.tokens[0], expected)  # dp rank 1's first sample: index 1


# --------------------------------------------------------------------------- progress


def test_the_validation_loss_reaches_status_progress() -> None:
    m = TrainerMetrics("job", rank=0, local_rank=0, world_size=2, multiprocess=False)
    m.step.labels("job").set(10)
    m.record_validation(2.25)
    assert m.registry is not None
    sample = parse(generate_latest(m.registry).decode(), "job")
    assert sample.validation_loss == 2.25
    out = progress(sample, 100, "T")
    assert out is not None and out["validationLoss"] == "2.2500"
