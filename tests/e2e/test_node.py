"""The real worker node: pods run from locally built images, reach the API server and each other by
Service name, `kubectl logs`, `exec` and `port-forward` work, and nothing leaves the bridge.

The pods use the operator image (Debian + Python + the kubernetes client; small next to the
trainer image): it has what a probe needs without any extra image.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from typing import Any

import pytest

from devtools.cluster import Cluster, host, read_versions
from devtools.cluster.deploy import OPERATOR_IMAGE, built_image

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

Obj = dict[str, Any]


def pod(
    cluster: Cluster, name: str, command: list[str], restart: str = "Never", **labels: str
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name, **labels}},
        "spec": {
            "restartPolicy": restart,
            "nodeSelector": {host.NODE_LABEL: "true"},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": built_image(OPERATOR_IMAGE),
                "imagePullPolicy": "Never",
                "command": command,
                "ports": [{"containerPort": 8080}],
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                              "limits": {"memory": "256Mi"}},
            }],
        },
    }  # fmt: skip


def create(cluster: Cluster, namespace: str, *objs: Obj) -> None:
    for obj in objs:
        obj["metadata"]["namespace"] = namespace
    cluster.apply(list(objs))


def wait_phase(
    cluster: Cluster, namespace: str, name: str, *phases: str, timeout: float = 90
) -> Obj:
    def reached() -> Obj | None:
        obj = cluster.get("pod", name, namespace) or {}
        return obj if obj.get("status", {}).get("phase") in phases else None

    return cluster.wait_for(reached, timeout=timeout, what=f"pod {name} {'/'.join(phases)}")


def python_pod(cluster: Cluster, name: str, code: str) -> Obj:
    return pod(cluster, name, ["python", "-c", code])


def run_to_completion(cluster: Cluster, namespace: str, name: str, code: str) -> tuple[str, str]:
    """Run `code` in a pod on the real node; return (phase, logs)."""
    create(cluster, namespace, python_pod(cluster, name, code))
    done = wait_phase(cluster, namespace, name, "Succeeded", "Failed")
    logs = cluster.kubectl("logs", "-n", namespace, name).stdout
    return done["status"]["phase"], logs


WEB = ["python", "-m", "http.server", "8080", "--directory", "/opt/kubetron"]


@pytest.fixture
def web(cluster: Cluster, namespace: str) -> str:
    """A pod serving HTTP on 8080 behind a ClusterIP Service `web`; returns the pod name."""
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }  # fmt: skip
    create(cluster, namespace, pod(cluster, "web", WEB, restart="Always"), service)
    wait_phase(cluster, namespace, "web", "Running")
    return "web"


def test_pod_runs_on_the_real_node_with_logs_exec_and_port_forward(
    cluster: Cluster, namespace: str, web: str
) -> None:
    obj = cluster.get("pod", web, namespace) or {}
    assert obj["spec"]["nodeName"] == host.NODE_NAME
    ip = obj["status"]["podIP"]
    assert ip.startswith(host.NODE_IP.rsplit(".", 1)[0] + ".") and ip != host.NODE_IP

    out = cluster.kubectl("exec", "-n", namespace, web, "--", "getent", "hosts",
                          f"kubernetes.default.svc.{host.CLUSTER_DOMAIN}").stdout  # fmt: skip
    assert out.split()[0] == host.KUBERNETES_SERVICE_IP

    # port-forward: kubectl -> API server -> kubelet (by InternalIP) -> containerd -> the pod.
    argv = [
        str(cluster.bin_dir / "kubectl"),
        f"--kubeconfig={cluster.kubeconfig}",
        "port-forward",
        "-n",
        namespace,
        f"pod/{web}",
        ":8080",
        "--address=127.0.0.1",
    ]
    forward = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+) -> 8080", line)
        assert match, f"port-forward said: {line!r}"
        url = f"http://127.0.0.1:{match[1]}/"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and "bin/" in resp.read().decode()
    finally:
        forward.terminate()
        forward.wait(timeout=10)

    # The GET above went through the pod, so the server logged it.
    assert '"GET / HTTP/1.1" 200' in cluster.kubectl("logs", "-n", namespace, web).stdout


def test_pods_reach_the_api_server_and_services_by_name(
    cluster: Cluster, namespace: str, web: str
) -> None:
    code = f"""
import urllib.request
from kubernetes import client, config
config.load_incluster_config()  # KUBERNETES_SERVICE_HOST -> the `kubernetes` Service
print("version", client.VersionApi().get_code().git_version)
url = "http://web.{namespace}.svc.{host.CLUSTER_DOMAIN}"
body = urllib.request.urlopen(url, timeout=10).read()
print("web", len(body))
body = urllib.request.urlopen("http://web", timeout=10).read()  # the pod's search domains
print("short", len(body))
"""
    phase, logs = run_to_completion(cluster, namespace, "client", code)
    assert phase == "Succeeded", logs
    assert f"version {read_versions()['KUBERNETES_VERSION']}" in logs
    assert re.search(r"^web [1-9]\d*$", logs, re.M) and re.search(r"^short [1-9]", logs, re.M)


def test_nothing_leaves_the_bridge(cluster: Cluster, namespace: str) -> None:
    code = """
import socket
for host in ("pypi.org", "pypi.org.", "example.com."):
    try:
        print("resolved", host, socket.gethostbyname(host))
    except OSError as err:
        print("no-dns", host, type(err).__name__)
for addr in ("1.1.1.1", "192.0.2.1", "8.8.8.8"):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((addr, 443))
        print("connected", addr)
    except OSError as err:
        print("blocked", addr, err.errno)
"""
    phase, logs = run_to_completion(cluster, namespace, "escape", code)
    assert phase == "Succeeded", logs
    assert "resolved" not in logs and "connected" not in logs, logs
    assert logs.count("no-dns") == 3 and logs.count("blocked") == 3, logs
