"""Every example in manifests/examples/ parses, plans and renders (cluster tests apply them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetron_api.parse import load_documents, parse_job
from kubetron_operator.cli import main
from kubetron_operator.plan import plan
from kubetron_operator.render import render

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "examples").glob("*.yaml"))


def test_examples_cover_the_required_cases() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"gpt-tiny-cpu", "qwen3-1.7b-1gpu", "qwen3-8b-2x8", "qwen3-30b-a3b-moe"} <= names
    assert {"suspended", "kueue-queue"} <= names
    assert {"qwen3-0.6b-dpo", "qwen3-distill", "tiny-dpo-cpu", "tiny-distill-cpu"} <= names


def claims(spec: dict[str, Any]) -> list[str]:
    """The PersistentVolumeClaims a MegatronJob's pods mount."""
    volumes = spec.get("resources", {}).get("volumes", [])
    out = [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]
    checkpoint = spec.get("checkpoint", {}).get("volume")
    return out + ([checkpoint["claimName"]] if checkpoint else [])


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_states_what_it_needs(path: Path) -> None:
    """The comment block above the job says what a cluster must hold to run it: every claim it
    mounts and every weights directory its models start from."""
    text = path.read_text()
    head = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "It needs:" in head, path.name
    spec = yaml.safe_load(text)["spec"]
    for claim in claims(spec):
        assert f"`{claim}`" in head, (path.name, claim)
    models = spec.get("models") or [spec["model"]]
    for weights in {m["weights"] for m in models if m.get("weights")}:
        assert weights in head, (path.name, weights)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_parses_plans_and_renders(path: Path) -> None:
    for source, obj in load_documents(path):
        job = parse_job(obj, source)
        objs = render(job, plan(job))
        assert [o["kind"] for o in objs] == ["ConfigMap", "PyTorchJob"]


def test_cli_validate_accepts_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, EXAMPLES)]) == 0
    assert capsys.readouterr().out.count("valid:") == len(EXAMPLES)


def test_cli_validate_names_tensor_and_gpus_per_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (EXAMPLES[0].parent / "qwen3-8b-2x8.yaml").read_text().replace("tensor: 4", "tensor: 3")
    )
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spec.parallelism.tensor=3 must divide spec.resources.gpusPerNode=8" in err


def test_cli_validate_reports_schema_errors_by_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    text = (EXAMPLES[0].parent / "gpt-tiny-cpu.yaml").read_text()
    bad.write_text(text.replace("tensor: 2", "tensor: 0\n    tensr: 2"))
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spec.parallelism.tensor: Input should be greater than or equal to 1" in err
    assert "spec.parallelism.tensr: Extra inputs are not permitted" in err


@pytest.mark.parametrize(
    "value", ["on", "off", "ce", "ce,norm,rope", "wgrad,adam", "swiglu,overlap"]
)
def test_fast_path_accepts_off_on_and_piece_lists(value: str) -> None:
    (_, obj), *_ = load_documents(EXAMPLES[0])
    obj["spec"].setdefault("recipe", {})["fastPath"] = value
    assert parse_job(obj).spec.recipe.fast_path == value


@pytest.mark.parametrize("value", ["fast", "ce,", "ce norm", "liger"])
def test_bad_fast_path_names_the_field_and_the_pieces(value: str) -> None:
    from kubetron_api.parse import SpecError

    (_, obj), *_ = load_documents(EXAMPLES[0])
    obj["spec"].setdefault("recipe", {})["fastPath"] = value
    with pytest.raises(SpecError) as info:
        parse_job(obj)
    text = str(info.value)
    assert "spec.recipe.fastPath" in text and "ce|norm|rope|cudnn|wgrad|adam" in text
