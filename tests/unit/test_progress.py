"""Live progress: the trainer's own metrics text parsed into `status.progress`, read by the
controller at most once per period while the job runs."""

from __future__ import annotations

import copy

from prometheus_client import generate_latest

from kubetron_operator.controller import Controller
from kubetron_operator.metrics import OperatorMetrics
from kubetron_operator.progress import Sample, parse, progress
from kubetron_trainer.observe.metrics import StepStats, TrainerMetrics
from tests.unit.fake_kube import FakeKube


def trainer_text(job: str = "job") -> str:
    """What a trainer pod's endpoint serves after two steps and a save (real metric names)."""
    m = TrainerMetrics(job, rank=0, local_rank=0, world_size=4, multiprocess=False, attempt=1)
    m.record_step(StepStats(9, 2.75, 0.7, 1e-4, 0.5, 4096, 8192.0, 1.5, 0.42))
    m.record_step(StepStats(10, 2.5, 0.7, 1e-4, 1.5, 4096, 20480.0, 1.5, 0.45))
    m.record_save(3.0, 10)
    m.record_engine("fast path (ce+norm+rope+cudnn+wgrad+adam)")
    assert m.registry is not None
    return generate_latest(m.registry).decode()


def test_the_trainers_metrics_become_progress() -> None:
    sample = parse(trainer_text(), "job")
    engine = "fast path (ce+norm+rope+cudnn+wgrad+adam)"
    assert sample == Sample(step=10, loss=2.5, tokens_per_second=20480.0, mfu=0.45,
                            last_checkpoint_step=10, attempt=1, mean_step_seconds=1.0,
                            engine=engine)  # fmt: skip
    assert progress(sample, 100, "T") == {
        "step": 10, "totalSteps": 100, "observedAt": "T", "loss": "2.5000",
        "tokensPerSecond": 20480, "mfu": "45.0%", "etaSeconds": 90, "lastCheckpointStep": 10,
        "engine": engine,
    }  # fmt: skip
    assert parse(trainer_text(), "another-job") == Sample()  # another job's series: ignored
    assert progress(Sample(), 100, "T") is None  # before the first step


def running(fake: FakeKube, ip: str = "10.213.0.20") -> None:
    pj = fake.objects[("PyTorchJob", "ml", "job")]
    pj["status"] = {"conditions": [{"type": "Running", "status": "True", "reason": "Running"}]}
    labels = {"kubetron.io/job-name": "job", "training.kubeflow.org/job-role": "master",
              "kubetron.io/attempt": "1"}  # fmt: skip
    fake.put({"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "job-worker-0", "namespace": "ml", "labels": labels},
              "status": {"phase": "Running", "podIP": ip}})  # fmt: skip


def test_running_job_gets_progress_at_most_once_per_period(kube: FakeKube) -> None:
    reads: list[tuple[str, int]] = []
    now = [0.0]

    def read(ip: str, port: int) -> str:
        reads.append((ip, port))
        return trainer_text()

    c = Controller(kube, OperatorMetrics(), progress_period=15, read_metrics=read,  # type: ignore[arg-type]
                   clock=lambda: now[0])  # fmt: skip
    c.reconcile("ml", "job")
    running(kube)
    c.reconcile("ml", "job")
    status = kube.objects[("MegatronJob", "ml", "job")]["status"]
    assert reads == [("10.213.0.20", 9400)]
    assert status["progress"]["step"] == 10 and status["progress"]["totalSteps"] == 100
    assert status["progress"]["attempt"] == 1
    assert status["progress"]["advancedAt"] == status["progress"]["observedAt"]
    first = copy.deepcopy(status["progress"])
    now[0] += 5
    c.reconcile("ml", "job")  # within the period: no read, the reading stays
    assert len(reads) == 1
    assert kube.objects[("MegatronJob", "ml", "job")]["status"]["progress"] == first
    now[0] += 15
    c.reconcile("ml", "job")
    assert len(reads) == 2


def test_unreadable_endpoint_keeps_the_last_reading(kube: FakeKube) -> None:
    def refuse(ip: str, port: int) -> str:
        raise ConnectionRefusedError(ip)

    c = Controller(kube, OperatorMetrics(), read_metrics=refuse)  # type: ignore[arg-type]
    c.reconcile("ml", "job")
    running(kube)
    assert c.reconcile("ml", "job") == "success"
    assert "progress" not in kube.objects[("MegatronJob", "ml", "job")]["status"]
