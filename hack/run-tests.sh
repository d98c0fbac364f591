#!/usr/bin/env bash
# Run the whole test suite; pytest's exit code 5 (no tests collected) is a failure to report,
# not a pass, except when a filter was passed on purpose.
#
# Before pytest starts: every tool a test needs is installed (Prometheus and promtool, from
# Debian's package: hack/install-prometheus.sh, idempotent), and the cluster that `make demo` or
# `make cluster-up` left running is stopped (said so in the output): the tests start their own,
# and the two would share the machine's one real node. KUBETRON_REUSE_CLUSTER=1 runs the tests
# against that cluster instead, so it is left up.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ! bash hack/install-prometheus.sh >/dev/null; then
  echo "run-tests: hack/install-prometheus.sh failed; tests/prometheus will report it" >&2
fi
if [[ -z "${KUBETRON_REUSE_CLUSTER:-}" ]]; then
  .venv/bin/python -m devtools.cluster down-before-tests || exit 1
fi
.venv/bin/python -m pytest "${@:-tests}" -p no:cacheprovider
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "run-tests: pytest collected no tests (exit 5); treating as failure" >&2
  exit 1
fi
exit $rc
