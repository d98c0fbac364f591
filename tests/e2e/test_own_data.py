"""A user's own tokenizer, conversations and Hugging Face weights, in pods on the real node: the
prepare-data Job of manifests/jobs/prepare-data.yaml (trainer image, restricted pod security,
`--chat`) turns chat JSONL on a volume into an indexed dataset with its loss mask, then the SFT
example manifests/examples/qwen3-0.6b-sft.yaml, shrunk to a tiny Qwen3 and CPU processes,
fine-tunes the weights on it through the operator to Succeeded, and the export of its
checkpoint loads in transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import Cluster, deploy
from devtools.hf_tokenizer import build_chat_bpe, conversations
from tests.hf_models import OVERRIDES, save_hf_model

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PREPARE_JOB = ROOT / "manifests" / "jobs" / "prepare-data.yaml"
SFT_EXAMPLE = ROOT / "manifests" / "examples" / "qwen3-0.6b-sft.yaml"
NAMESPACE, RELEASE = "e2e-data", "kubetron-e2e-data"
DATA_CLAIM, CKPT_CLAIM = "sft-data", "qwen3-sft-checkpoints"  # what the example mounts
TIMEOUT = 600.0


@pytest.fixture(scope="module")
def volumes(cluster: Cluster) -> Iterator[tuple[Path, Path]]:
    """The namespace (restricted), an operator watching it, and the example's two claims; the
    data volume holds a tokenizer, tiny Qwen3 weights and raw conversations, as a user's
    would. Yields the data and checkpoint directories on the host."""
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    for ns in (NAMESPACE, RELEASE):
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": restricted},
            }
        )
    deploy.install_operator(
        cluster, RELEASE, RELEASE, watch=[NAMESPACE], crds=False, progress_seconds=2
    )
    data = deploy.checkpoint_claim(cluster, NAMESPACE, DATA_CLAIM)
    ckpt = deploy.checkpoint_claim(cluster, NAMESPACE, CKPT_CLAIM)
    build_chat_bpe(data / "tokenizer")
    save_hf_model("qwen3", 512, data / "models" / "tiny")
    for file in (data / "models" / "tiny").iterdir():  # safetensors writes 0600: the
        file.chmod(0o644)  # image's user must read them (the trainer's check says so)
    (data / "raw").mkdir()
    lines = [json.dumps({"messages": c}) for c in conversations(200, seed=8)]
    (data / "raw" / "chat.jsonl").write_text("\n".join(lines) + "\n")
    (data / "sft").mkdir()
    (data / "sft").chmod(0o777)  # the Job writes here as the image's non-root user
    yield data, ckpt
    deploy.uninstall_operator(cluster, RELEASE, RELEASE)
    cluster.kubectl("delete", "namespace", NAMESPACE, RELEASE, "--wait=false")


def prepare_job() -> dict[str, Any]:
    """manifests/jobs/prepare-data.yaml with this test's inputs, sized for the test node."""
    job: dict[str, Any] = yaml.safe_load(PREPARE_JOB.read_text())
    job["metadata"]["namespace"] = NAMESPACE
    pod = job["spec"]["template"]["spec"]
    pod["volumes"][0]["persistentVolumeClaim"]["claimName"] = DATA_CLAIM
    container = pod["containers"][0]
    container["image"] = deploy.built_image(deploy.TRAINER_CPU_IMAGE)
    container["imagePullPolicy"] = "Never"  # imported into the node's containerd
    container["args"] = [
        "/data/raw/*.jsonl", "--chat", "--tokenizer", "/data/tokenizer",
        "--output-prefix", "/data/sft/chat", "--workers", "1",
    ]  # fmt: skip
    container["resources"] = {"requests": {"cpu": "500m", "memory": "2Gi"},
                              "limits": {"memory": "2Gi"}}  # fmt: skip
    return job


def test_prepare_job_then_sft_example_train_in_pods(
    cluster: Cluster, volumes: tuple[Path, Path]
) -> None:
    data, ckpt = volumes
    cluster.apply(prepare_job())

    def job_done() -> dict[str, Any] | None:
        job = cluster.get("job", "prepare-data", NAMESPACE) or {}
        conditions = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
        return job if conditions.get("Complete") == "True" or conditions.get("Failed") else None

    job = cluster.wait_for(job_done, timeout=TIMEOUT, what="the prepare-data Job to finish")
    log = cluster.kubectl("logs", "-n", NAMESPACE, "job/prepare-data").stdout
    assert job["status"].get("succeeded") == 1, log[-3000:]
    assert "prepare-data: 200 documents (0 empty, skipped)" in log, log[-3000:]
    names = {p.name for p in (data / "sft").iterdir()}
    assert names == {"chat.bin", "chat.idx", "chat.loss_mask.bin", "chat.loss_mask.idx"}

    mj = deploy.example_job(
        SFT_EXAMPLE,
        model={"weights": "/data/models/tiny", "overrides": {**OVERRIDES, "vocabSize": 512}},
        recipe={"trainIters": 12, "globalBatchSize": 4, "microBatchSize": 2, "seqLength": 256,
                "precision": "fp32", "logInterval": 1, "optimizer": {"lr": 3e-3, "minLr": 0.0},
                "lrSchedule": {"warmupIters": 0}},
        parallelism={"tensor": 2},
        data={"tokenizer": {"type": "huggingface", "name": "/data/tokenizer"}},
        checkpoint={"saveInterval": 6},
        resources={"device": "cpu", "image": deploy.built_image(deploy.TRAINER_CPU_IMAGE),
                   "gpusPerNode": 2, "cpu": "900m", "memory": "3Gi", "sharedMemory": "512Mi"},
    )  # fmt: skip
    mj["metadata"]["namespace"] = NAMESPACE
    name = mj["metadata"]["name"]
    cluster.apply(mj)
    final = deploy.wait_final(cluster, NAMESPACE, name, TIMEOUT)
    rank0_pod = f"{name}-worker-0"
    log = deploy.logs(cluster, NAMESPACE, rank0_pod)
    assert final["status"]["phase"] == "Succeeded", log[-4000:]
    assert "chat data: 200 conversations" in log, log[-4000:]
    losses = [loss for _, loss, _ in deploy.steps(log)]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0], losses
    assert (ckpt / "latest").read_text().strip() == "12"

    # the user's way out: kubetron-export of the pod-written checkpoint loads in transformers
    out = data / "export"
    env = dict(os.environ) | {
        "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("trainer", "api"))
    }
    done = subprocess.run(
        [sys.executable, "-m", "kubetron_trainer.tools.export", str(ckpt), str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 2
