#!/usr/bin/env bash
# Where the control-plane binaries pinned in hack/versions.env live. Source it (bash) to get
# KUBETRON_CACHE, KUBETRON_BIN_DIR and the pinned versions; run it to print `export` lines:
#   eval "$(bash hack/tools-env.sh)" && kubectl version --client
# devtools/cluster/paths.py computes the same path from the same file.
# Strict mode only when executed: sourcing must not change the caller's shell options.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then set -euo pipefail; fi

_kubetron_hack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/versions.env
source "$_kubetron_hack_dir/versions.env"
KUBETRON_CACHE=${KUBETRON_CACHE:-$HOME/.cache/kubetron}
KUBETRON_BIN_DIR=$KUBETRON_CACHE/bin/$KUBERNETES_VERSION
export KUBETRON_CACHE KUBETRON_BIN_DIR

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "export KUBETRON_CACHE='$KUBETRON_CACHE'"
  echo "export KUBETRON_BIN_DIR='$KUBETRON_BIN_DIR'"
  echo "export PATH='$KUBETRON_BIN_DIR':\"\$PATH\""
fi
