#!/usr/bin/env bash
# Run the whole test suite; pytest's exit code 5 (no tests collected) is a failure to report,
# not a pass, except when a filter was passed on purpose.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
.venv/bin/python -m pytest "${@:-tests}" -p no:cacheprovider
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "run-tests: pytest collected no tests (exit 5); treating as failure" >&2
  exit 1
fi
exit $rc
