#!/usr/bin/env bash
# Debian packages the real worker node and the image build need (make tools calls this):
#   containerd, runc, CNI plugins  the node's container runtime and pod network
#   iptables, conntrack, iproute2  kube-proxy and the harness's bridge
#   mmdebstrap, buildah            the local CPU base image and Dockerfile builds without a daemon
#   openssl, ca-certificates       certificates for the node, kube-proxy and CoreDNS
# Idempotent: apt-get runs only when a package is missing. The node needs root anyway, so this
# script does not try sudo; without root it says what to install and fails.
set -euo pipefail

PACKAGES=(containerd runc containernetworking-plugins iptables conntrack iproute2
  mmdebstrap buildah openssl ca-certificates)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-node-deps: up to date" >&2
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-node-deps: missing Debian packages: ${missing[*]}; install them as root" >&2
  exit 1
fi
echo "install-node-deps: apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian containerd package starts a system containerd; the harness runs its own (own
# socket, root and state dirs), so the packaged service is stopped and not left running.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet containerd 2>/dev/null; then
  systemctl stop containerd || true
  systemctl disable containerd >/dev/null 2>&1 || true
fi
echo "install-node-deps: done" >&2
