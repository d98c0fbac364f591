"""Jobs of several models in pods on the real node, each example as a user runs it.

DPO: the prepare-data Job (trainer image, restricted pod security, `--preference`) turns
prompt/chosen/rejected JSONL on a volume into preference pairs; manifests/examples/
tiny-dpo-cpu.yaml then trains a tiny Qwen3 policy (TP2 x DP2) against a frozen reference (DP4)
co-located in one pod of 4 CPU processes, both from the same Hugging Face weights, through the
operator to Succeeded; the status lists both models and the policy's loss, the checkpoints are
the policy's alone, and `kubetron-export --model policy` gives a checkpoint transformers loads.
Distillation: manifests/examples/tiny-distill-cpu.yaml trains a tiny student (DP2) on a tiny
teacher's logits (TP2) in one pod of 2 processes, on conversations prepared with the same tool
(`--chat`, here on the host).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from devtools.cluster import Cluster, deploy
from devtools.hf_tokenizer import build_chat_bpe, conversations
from kubetron_trainer.tools import prepare
from tests.e2e.test_own_data import prepare_job
from tests.e2e.test_train import report
from tests.hf_models import save_hf_model

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
NAMESPACE, RELEASE = "e2e-models", "kubetron-e2e-models"
# the claims the examples mount
DPO_DATA, DPO_CKPT = "tiny-dpo-data", "tiny-dpo-checkpoints"
DISTILL_DATA, DISTILL_CKPT = "tiny-distill-data", "tiny-distill-checkpoints"
WEIGHTS = "models/tiny-qwen3"  # under /data, as the examples name them
PAIRS, WRONG = 64, "I cannot say."
TIMEOUT = 600.0


@pytest.fixture(scope="module")
def claims(cluster: Cluster) -> Iterator[dict[str, Path]]:
    """The namespace (restricted), an operator watching it, and the examples' claims, each data
    volume holding a tokenizer and tiny Qwen3 weights; yields each claim's host directory."""
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    for ns in (NAMESPACE, RELEASE):
        metadata = {"name": ns, "labels": restricted}
        cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
    deploy.install_operator(
        cluster, RELEASE, RELEASE, watch=[NAMESPACE], crds=False, progress_seconds=2
    )
    dirs = {
        claim: deploy.checkpoint_claim(cluster, NAMESPACE, claim)
        for claim in (DPO_DATA, DPO_CKPT, DISTILL_DATA, DISTILL_CKPT)
    }
    for claim in (DPO_DATA, DISTILL_DATA):
        build_chat_bpe(dirs[claim] / "tokenizer")
        save_hf_model("qwen3", 512, dirs[claim] / WEIGHTS)
        for file in (dirs[claim] / WEIGHTS).iterdir():  # safetensors writes 0600: the
            file.chmod(0o644)  # image's user must read them
    yield dirs
    deploy.uninstall_operator(cluster, RELEASE, RELEASE)
    cluster.kubectl("delete", "namespace", NAMESPACE, RELEASE, "--wait=false")


def preference_job() -> dict[str, Any]:
    """The prepare-data Job (manifests/jobs/prepare-data.yaml, sized for the test node) with
    `--preference`, on the DPO example's data claim."""
    job = prepare_job()
    job["metadata"]["namespace"] = NAMESPACE
    pod = job["spec"]["template"]["spec"]
    pod["volumes"][0]["persistentVolumeClaim"]["claimName"] = DPO_DATA
    pod["containers"][0]["args"] = [
        "/data/raw/*.jsonl", "--preference", "--tokenizer", "/data/tokenizer",
        "--output-prefix", "/data/dpo/pairs", "--workers", "1",
    ]  # fmt: skip
    return job


def run_example(cluster: Cluster, example: str) -> tuple[dict[str, Any], str]:
    """Apply the example with the built CPU trainer image; wait until it ends. Returns the final
    MegatronJob and global rank 0's log."""
    mj = deploy.example_job(
        EXAMPLES / example, resources={"image": deploy.built_image(deploy.TRAINER_CPU_IMAGE)}
    )
    mj["metadata"]["namespace"] = NAMESPACE
    name = mj["metadata"]["name"]
    cluster.apply(mj)
    final = deploy.wait_final(cluster, NAMESPACE, name, TIMEOUT)
    assert final["status"]["phase"] == "Succeeded", report(cluster, NAMESPACE, name)
    return final, deploy.logs(cluster, NAMESPACE, f"{name}-worker-0")


def models_status(final: dict[str, Any]) -> list[tuple[str, bool, str, int, int]]:
    """status.models as (name, trainable, ranks, tensor, data)."""
    out = []
    for m in final["status"]["models"]:
        shape = m["parallelism"]
        out.append((m["name"], m["trainable"], m["ranks"], shape["tensor"], shape["data"]))
    return out


def prepare_pairs(cluster: Cluster, data: Path) -> None:
    """Preference rows as a user has them (TRL's standard shape), prepared in a pod by the
    prepare-data Job into /data/dpo/pairs."""
    (data / "raw").mkdir()
    rows = [
        {"prompt": c[-2]["content"], "chosen": c[-1]["content"], "rejected": WRONG}
        for c in conversations(PAIRS, seed=11)
    ]
    (data / "raw" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "dpo").mkdir()
    (data / "dpo").chmod(0o777)  # the Job writes here as the image's non-root user
    cluster.apply(preference_job())

    def job_done() -> dict[str, Any] | None:
        job = cluster.get("job", "prepare-data", NAMESPACE) or {}
        conditions = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
        return job if conditions.get("Complete") == "True" or conditions.get("Failed") else None

    job = cluster.wait_for(job_done, timeout=TIMEOUT, what="the prepare-data Job to finish")
    log = cluster.kubectl("logs", "-n", NAMESPACE, "job/prepare-data").stdout
    assert job["status"].get("succeeded") == 1, log[-3000:]
    assert f"prepare-data: {PAIRS} preference pairs, {2 * PAIRS} documents" in log, log[-3000:]
    assert (data / "dpo" / "pairs.pairs.json").is_file()


def command(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """One of the project's console scripts, as a user runs it against the volume."""
    argv = [str(Path(sys.executable).parent / name), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def test_dpo_example_trains_in_pods_and_its_policy_exports(
    cluster: Cluster, claims: dict[str, Path]
) -> None:
    data, ckpt = claims[DPO_DATA], claims[DPO_CKPT]
    prepare_pairs(cluster, data)
    final, log = run_example(cluster, "tiny-dpo-cpu.yaml")
    assert models_status(final) == [
        ("policy", True, "0-3", 2, 2),
        ("reference", False, "0-3", 1, 4),
    ]
    assert "model policy: ranks 0-3, " in log and "model reference: ranks 0-3, " in log, log[-4000:]
    steps = deploy.steps(log)
    losses = [loss for _, loss, _ in steps]
    assert [s for s, _, _ in steps] == list(range(1, 13)), log[-4000:]
    # the policy starts from the reference's weights: every pair's margin is 0, the loss ln 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3), losses
    assert losses[-1] < losses[0] - 0.1, losses  # it learns to prefer the chosen answers
    assert "reward accuracy" in log, log[-4000:]

    # status.parallelism, the progress and `kubectl get mj` are the policy's
    shape, progress = final["status"]["parallelism"], final["status"]["progress"]
    assert (shape["tensor"], shape["data"]) == (2, 2), shape
    assert 1 <= progress["step"] <= 12 and float(progress["loss"]) > 0, progress
    name = final["metadata"]["name"]
    table = cluster.kubectl("get", "mj", name, "-n", NAMESPACE).stdout.splitlines()
    row = dict(zip(table[0].split(), table[1].split(), strict=False))
    assert (row["WORLD"], row["TP"], row["DP"], row["LOSS"]) == ("4", "2", "2", progress["loss"])

    # checkpoints: the policy's alone, in its own directory
    assert {p.name for p in ckpt.iterdir()} == {"policy"}
    assert (ckpt / "policy" / "latest").read_text().strip() == "12"
    listed = command("kubetron", "checkpoints", str(ckpt))
    assert listed.returncode == 0 and "model policy" in listed.stdout, listed.stdout + listed.stderr

    # the user's way out: kubetron-export --model policy loads in transformers
    done = command("kubetron-export", str(ckpt), str(data / "export"), "--model", "policy")
    assert done.returncode == 0, done.stderr[-3000:]
    import transformers

    policy = transformers.AutoModelForCausalLM.from_pretrained(data / "export").eval()
    start = transformers.AutoModelForCausalLM.from_pretrained(data / WEIGHTS).eval()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, before = policy(input_ids=tokens).logits, start(input_ids=tokens).logits
    assert logits.shape == (2, 24, 512) and torch.isfinite(logits).all()
    assert not torch.allclose(logits, before)  # the trained policy, not its start


def test_distill_example_trains_in_pods(cluster: Cluster, claims: dict[str, Path]) -> None:
    data, ckpt = claims[DISTILL_DATA], claims[DISTILL_CKPT]
    (data / "raw").mkdir()
    lines = [json.dumps({"messages": c}) for c in conversations(200, seed=12)]
    (data / "raw" / "chat.jsonl").write_text("\n".join(lines) + "\n")
    argv = [
        str(data / "raw" / "chat.jsonl"), "--chat", "--tokenizer", str(data / "tokenizer"),
        "--output-prefix", str(data / "sft" / "chat"), "--workers", "1",
    ]  # fmt: skip
    assert prepare.main(argv) == 0

    final, log = run_example(cluster, "tiny-distill-cpu.yaml")
    assert models_status(final) == [("teacher", False, "0-1", 2, 1), ("student", True, "0-1", 1, 2)]
    steps = deploy.steps(log)
    losses = [loss for _, loss, _ in steps]
    assert [s for s, _, _ in steps] == list(range(1, 13)), log[-4000:]
    assert losses[-1] < losses[0], losses
    assert "distill kl" in log, log[-4000:]
    assert {p.name for p in ckpt.iterdir()} == {"student"}
    assert (ckpt / "student" / "latest").read_text().strip() == "12"
