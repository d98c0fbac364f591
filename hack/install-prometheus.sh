#!/usr/bin/env bash
# Install a Prometheus server for tests/prometheus from Debian's `prometheus` package.
# Idempotent: does nothing when a prometheus binary is already on PATH (or at $PROMETHEUS).
# The package's systemd unit is not started (no init system here, and the tests start their own
# server on a loopback port with a temp config and data dir). Prints the binary's path.
set -euo pipefail

if [[ -n "${PROMETHEUS:-}" && -x "$PROMETHEUS" ]]; then
  echo "$PROMETHEUS"
  exit 0
fi
if command -v prometheus >/dev/null 2>&1; then
  command -v prometheus
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install-prometheus: need root for apt-get (or set PROMETHEUS=/path/to/prometheus)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# A fresh machine has no package lists yet; refresh them once per run of this script.
apt-get update -qq >&2
# policy-rc.d keeps the package's post-install from starting a system-wide Prometheus.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[[ $created_policy -eq 1 ]] && rm -f "$policy"' EXIT
apt-get install -y -qq --no-install-recommends prometheus >&2
command -v prometheus
