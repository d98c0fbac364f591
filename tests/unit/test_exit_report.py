"""The final status: global rank 0's exit report, written by the trainer, handed to Kubernetes as
its pod's termination message by the launcher, and read back by the operator into
`status.progress` when the job ends (instead of the last poll of the metrics endpoint)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kubetron_api.final import TERMINATION_MESSAGE_LIMIT, ExitReport, FinalProgress
from kubetron_operator.controller import Controller
from kubetron_operator.metrics import OperatorMetrics
from kubetron_operator.progress import final_progress
from kubetron_trainer.__main__ import exit_report, record_exit_code
from kubetron_trainer.launch import pod_exit_code, read_worker_codes, termination_message
from kubetron_trainer.observe.metrics import StepStats
from kubetron_trainer.runtime.evaluate import Evaluation
from kubetron_trainer.runtime.loop import Summary
from tests.unit.fake_kube import FakeKube
from tests.unit.test_checkpoint_meta import config
from tests.unit.test_progress import running, trainer_text

Obj = dict[str, object]

REPORT = ExitReport(
    final=FinalProgress(
        step=30, loss=6.05093, validation_loss=6.2, tokens_per_second=51234.6, checkpoint_step=30
    )
)


def summary(steps: int = 30) -> Summary:
    s = Summary("job", "cpu", "sdpa", "decentralized", 0)
    for step in range(1, steps + 1):
        loss = 10.0 - step * 0.1
        s.steps.append(StepStats(step, loss, 0.7, 1e-4, 0.5, 4096, 8192.0, 1.5, None))
    s.tokens_per_s = 8000.5
    s.validation.append(Evaluation(step=30, loss=7.25, perplexity=1408.1, tokens=512, seconds=1))
    return s


def test_the_message_is_small_json_and_parses_back() -> None:
    text = REPORT.to_message()
    assert len(text.encode()) < TERMINATION_MESSAGE_LIMIT
    assert json.loads(text) == {"final": {
        "step": 30, "loss": 6.05093, "validationLoss": 6.2, "tokensPerSecond": 51234.6,
        "checkpointStep": 30,
    }}  # fmt: skip
    assert ExitReport.from_message(text) == REPORT
    nan = ExitReport(final=FinalProgress(step=3, loss=float("nan")))
    assert ExitReport.from_message(nan.to_message()).final.loss is None  # JSON has no NaN


def test_the_trainer_reports_its_last_step_loss_evaluation_and_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("30\n")
    cfg = config(ckpt)
    report = exit_report(summary(), cfg)
    assert report is not None
    assert report.final == FinalProgress(
        step=30, loss=7.0, validation_loss=7.25, tokens_per_second=8000.5, checkpoint_step=30
    )
    assert exit_report(summary(steps=0), cfg) is None  # trained no step: nothing to report

    codes = tmp_path / "codes"
    monkeypatch.setenv("KUBETRON_EXIT_CODE_DIR", str(codes))
    record_exit_code(0, 0, report.to_message())
    record_exit_code(1, 0)  # the other ranks exit 0 without a report (as they always did)
    workers = read_worker_codes(codes)
    code = pod_exit_code(0, [c for c, _ in workers], signalled=False)
    message = termination_message(code, workers)
    assert code == 0 and ExitReport.from_message(message) == report  # verbatim, no rank prefix
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT


def test_a_failures_message_is_unchanged_by_a_report_of_another_rank(tmp_path: Path) -> None:
    (tmp_path / "rank-0").write_text("0\n" + REPORT.to_message())
    (tmp_path / "rank-1").write_text("2\n" + "config field x: bad " * 100)
    workers = read_worker_codes(tmp_path)
    code = pod_exit_code(1, [c for c, _ in workers], signalled=False)
    message = termination_message(code, workers)
    assert code == 2 and message.startswith("rank-1: config field x: bad")
    assert len(message) == 1024  # a failure's message is cut as before


def pod(name: str, code: int, message: str = "", attempt: str = "1") -> Obj:
    labels = {"kubetron.io/job-name": "job", "kubetron.io/attempt": attempt}
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
    if message:
        terminated["message"] = message
    return {
        "metadata": {"name": name, "namespace": "ml", "labels": labels},
        "status": {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
        },
    }


LAST_POLL = {"step": 14, "totalSteps": 30, "loss": "6.1530", "tokensPerSecond": 40000,
             "mfu": "12.0%", "etaSeconds": 20, "engine": "local spec", "attempt": 1,
             "observedAt": "T0", "advancedAt": "T0"}  # fmt: skip


def test_a_terminated_pods_report_becomes_the_final_progress() -> None:
    pods = [pod("job-worker-1", 0), pod("job-worker-0", 0, REPORT.to_message())]
    final, why = final_progress(pods, LAST_POLL, 1, 30, "T1")
    assert why == ""
    assert final == {"step": 30, "totalSteps": 30, "loss": "6.0509", "validationLoss": "6.2000",
                     "tokensPerSecond": 51235, "lastCheckpointStep": 30, "mfu": "12.0%",
                     "etaSeconds": 0, "engine": "local spec", "attempt": 1,
                     "observedAt": "T1", "advancedAt": "T1"}  # fmt: skip


@pytest.mark.parametrize(
    ("pods", "says"),
    [
        ([pod("job-worker-0", 0)], "no container that exited 0 left an exit report"),
        ([pod("job-worker-0", 0, '{"final": {"step": ')], "pod job-worker-0 container trainer"),
        ([pod("job-worker-0", 0, '{"other": 1}')], "final"),
        ([pod("job-worker-0", 2, "rank-3: config field x: bad")], "no container"),  # an error
    ],
)
def test_a_missing_or_garbled_report_keeps_the_last_poll(pods: list[Obj], says: str) -> None:
    final, why = final_progress(pods, LAST_POLL, 1, 30, "T1")
    assert final is None and says in why


def succeed_with(kube: FakeKube, pods: list[Obj]) -> Obj:
    def read(ip: str, port: int) -> str:
        return trainer_text()  # step 10

    c = Controller(kube, OperatorMetrics(), read_metrics=read)  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    running(kube)
    c.reconcile("ml", "job")
    assert kube.objects[("MegatronJob", "ml", "job")]["status"]["progress"]["step"] == 10
    del kube.objects[("Pod", "ml", "job-worker-0")]
    for p in pods:
        kube.put({"apiVersion": "v1", "kind": "Pod", **p})
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    pj["status"] = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Done"}]}
    c.reconcile("ml", "job")
    status: Obj = kube.objects[("MegatronJob", "ml", "job")]["status"]
    assert status["phase"] == "Succeeded"
    return status


def test_a_succeeded_job_shows_the_trainers_final_numbers(kube: FakeKube) -> None:
    report = ExitReport(final=FinalProgress(step=100, loss=2.125, checkpoint_step=100))
    status = succeed_with(kube, [pod("job-worker-0", 0, report.to_message())])
    progress = status["progress"]
    assert isinstance(progress, dict)
    assert (progress["step"], progress["loss"], progress["lastCheckpointStep"]) == (
        100, "2.1250", 100
    )  # fmt: skip
    assert progress["etaSeconds"] == 0 and progress["engine"]  # the poll's engine stays


def test_a_succeeded_job_without_a_report_keeps_the_last_poll(
    kube: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kubetron.controller"):
        status = succeed_with(kube, [pod("job-worker-0", 0, "not json")])
    assert status["progress"]["step"] == 10  # type: ignore[index]
    assert "final progress from the last poll: pod job-worker-0 container trainer" in caplog.text


def test_the_report_of_a_pod_deleted_before_the_job_is_seen_done_is_kept(kube: FakeKube) -> None:
    """cleanPodPolicy All: the pod that ran rank 0 is gone when the PyTorchJob succeeds; the
    watch event of its end carried the report."""
    c = Controller(kube, OperatorMetrics(), read_metrics=lambda ip, port: trainer_text())  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    running(kube)
    c.reconcile("ml", "job")
    ended = {"apiVersion": "v1", "kind": "Pod", **pod("job-worker-0", 0, REPORT.to_message())}
    assert c.note_pod(ended) == "job"
    del kube.objects[("Pod", "ml", "job-worker-0")]
    pj = kube.objects[("PyTorchJob", "ml", "job")]
    pj["status"] = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Done"}]}
    c.reconcile("ml", "job")
    status = kube.objects[("MegatronJob", "ml", "job")]["status"]
    assert (status["phase"], status["progress"]["step"]) == ("Succeeded", 30)
