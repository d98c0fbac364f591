"""Certificates and kubeconfigs of one dev cluster, made with `openssl`.

A fresh CA per cluster signs every serving and client certificate (API server, admin, the
kubelet's and the webhooks'); kubeconfigs embed them, so a cluster's files are self-contained.
"""

from __future__ import annotations

import base64
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from devtools.cluster.host import KUBERNETES_SERVICE_IP, NODE_IP
from devtools.cluster.waiting import ClusterError


@dataclass(frozen=True)
class Pki:
    """Paths of the certificates and keys made for one cluster."""

    dir: Path

    def __getattr__(self, name: str) -> Path:  # ca_crt -> <dir>/ca.crt
        stem, _, ext = name.rpartition("_")
        return self.dir / f"{stem.replace('_', '-')}.{ext}"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def _new_ca(pki: Pki) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "30", "-subj", "/CN=kubetron-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki.dir,
    )  # fmt: skip


def new_leaf(pki: Pki, name: str, subject: str, usage: str, sans: str = "") -> None:
    """A CA-signed EC certificate <name>.crt / <name>.key."""
    ext = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if sans:
        ext.append(f"subjectAltName={sans}")
    (pki.dir / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki.dir,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "30",
        "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=pki.dir,
    )  # fmt: skip


def make_pki(directory: Path) -> Pki:
    """CA, API server serving cert, service-account key pair, admin (system:masters) client."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    _new_ca(pki)
    apiserver_sans = ",".join(
        ["IP:127.0.0.1", f"IP:{NODE_IP}", f"IP:{KUBERNETES_SERVICE_IP}"]
        + ["DNS:localhost", "DNS:kubernetes"]
        + [f"DNS:kubernetes.default{s}" for s in ("", ".svc", ".svc.cluster.local")]
    )
    new_leaf(pki, "apiserver", "/CN=kube-apiserver", "serverAuth", apiserver_sans)
    new_leaf(pki, "admin", "/O=system:masters/CN=kubetron-admin", "clientAuth")
    # The API server's identity towards kubelets (logs, exec, port-forward).
    new_leaf(pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet",
              "clientAuth")  # fmt: skip
    webhook_sans = "DNS:training-operator.kubeflow.svc,DNS:localhost,IP:127.0.0.1"
    new_leaf(pki, "webhook", "/CN=training-operator", "serverAuth", webhook_sans)
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key",
        cwd=directory,
    )  # fmt: skip
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
    return pki


def b64(path: Path) -> str:
    """A file's bytes as base64 text, as kubeconfigs and webhook configurations embed them."""
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, pki: Pki) -> None:
    """A self-contained admin kubeconfig (certificates embedded)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetron-test",
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_crt)},
            }
        ],
        "users": [
            {
                "name": "kubetron-admin",
                "user": {
                    "client-certificate-data": b64(pki.admin_crt),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {
                "name": "kubetron-test",
                "context": {"cluster": "kubetron-test", "user": "kubetron-admin"},
            }
        ],
        "current-context": "kubetron-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


# --------------------------------------------------------------------------- processes
