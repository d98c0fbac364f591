#!/usr/bin/env bash
# Build the pinned control-plane binaries (hack/versions.env) from the Go module proxy into
# $KUBETRON_CACHE/bin/<kubernetes version>/ so the cluster tests can run a real API server,
# controller-manager, scheduler, etcd, kwok and the Kubeflow training-operator without Docker,
# plus a slim CoreDNS for the cluster DNS, Kueue, and the Kubeflow Trainer v2 controller with
# the JobSet controller it drives (the TrainJob backend).
#
# Idempotent: every binary has a stamp holding a hash of what it was built from; a second run
# with nothing changed only checks stamps. The Kubernetes build is the slow one (tens of minutes
# cold on 2 cores), so it starts first, in the background, while the small tools build.
# Prints the bin dir on its last line.
set -euo pipefail

HACK=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/tools-env.sh
source "$HACK/tools-env.sh"
BIN=$KUBETRON_BIN_DIR
STAMPS=$BIN/.stamps
LOGS=$KUBETRON_CACHE/logs
JOBS=${KUBETRON_BUILD_JOBS:-2}
# Bump to force a rebuild when this script's build recipe changes.
RECIPE=1
export CGO_ENABLED=0

mkdir -p "$BIN" "$STAMPS" "$LOGS"
exec 9>"$BIN/.lock"
flock 9

log() { echo "build-tools: $*" >&2; }

# key NAME PARTS... -> a hash of the recipe, the version and the given files or strings.
key() {
  local name=$1
  shift
  {
    echo "$name recipe=$RECIPE"
    for part in "$@"; do
      if [[ -f "$part" ]]; then cat "$part"; else echo "$part"; fi
    done
  } | sha256sum | cut -d' ' -f1
}

# fresh KEY BINARIES... -> true when every binary exists and was built from KEY.
fresh() {
  local want=$1 name=$2
  shift 2
  for b in "$@"; do [[ -x "$BIN/$b" ]] || return 1; done
  [[ -f "$STAMPS/$name" && "$(cat "$STAMPS/$name")" == "$want" ]]
}

kube_ldflags() {
  local v=$KUBERNETES_VERSION major minor
  major=${v#v}
  major=${major%%.*}
  minor=${v#v"$major".}
  minor=${minor%%.*}
  local flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean"
  done
  echo "$flags"
}

KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

# Build the Kubernetes binaries into a staging dir, then move them into place and stamp them.
build_kube() {
  local want=$1 ldflags=$2 stage="$BIN/.stage-kube"
  rm -rf "$stage" && mkdir -p "$stage"
  local pkgs=()
  for b in "${KUBE_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  (cd "$HACK/go/kube" && go build -p "$JOBS" -trimpath -ldflags "$ldflags" -o "$stage/" "${pkgs[@]}")
  for b in "${KUBE_BINS[@]}"; do mv -f "$stage/$b" "$BIN/$b"; done
  rm -rf "$stage"
  echo "$want" >"$STAMPS/kube"
}

KUBE_PID=""
start_kube() {
  local ldflags want
  ldflags=$(kube_ldflags)
  want=$(key kube "$KUBERNETES_VERSION" "$HACK/go/kube/go.mod" "$HACK/go/kube/go.sum" "$ldflags")
  if fresh "$want" kube "${KUBE_BINS[@]}"; then
    log "kubernetes $KUBERNETES_VERSION: up to date"
    return
  fi
  log "kubernetes $KUBERNETES_VERSION: resolving modules"
  (cd "$HACK/go/kube" && go mod download)
  log "kubernetes $KUBERNETES_VERSION: building in the background (log: $LOGS/kube.log)"
  # Job control gives the background build its own process group, so stop_kube can end it.
  set -m
  build_kube "$want" "$ldflags" >"$LOGS/kube.log" 2>&1 &
  KUBE_PID=$!
  set +m
  trap stop_kube EXIT
}

# On an early exit, stop the background build instead of leaving it running.
stop_kube() {
  if [[ -n "$KUBE_PID" ]] && kill -0 "$KUBE_PID" 2>/dev/null; then
    log "stopping the background kubernetes build"
    kill -TERM -- "-$KUBE_PID" 2>/dev/null || true
  fi
}

build_etcd() {
  local want
  want=$(key etcd "$ETCD_VERSION" "$HACK/go/etcd/go.mod" "$HACK/go/etcd/go.sum" \
    "$HACK/go/etcd/main.go")
  if fresh "$want" etcd etcd; then
    log "etcd $ETCD_VERSION: up to date"
    return
  fi
  log "etcd $ETCD_VERSION: building"
  (cd "$HACK/go/etcd" && go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/etcd.new" .)
  mv -f "$BIN/etcd.new" "$BIN/etcd"
  echo "$want" >"$STAMPS/etcd"
}

# build_wrapper NAME MODULE VERSION PACKAGE LDFLAGS KEYFILES...: the binary NAME built from the
# wrapper module hack/go/NAME, which requires MODULE at VERSION (refused when it does not).
build_wrapper() {
  local name=$1 module=$2 version=$3 pkg=$4 ldflags=$5 dir="$HACK/go/$1" want
  shift 5
  if ! grep -q "^require $module $version\$" "$dir/go.mod"; then
    log "$name: $dir/go.mod does not require $module $version"
    exit 1
  fi
  want=$(key "$name" "$version" "$@")
  if fresh "$want" "$name" "$name"; then
    log "$name $version: up to date"
    return
  fi
  log "$name $version: building"
  (cd "$dir" && go build -p "$JOBS" -trimpath -ldflags "-s -w $ldflags" -o "$BIN/$name.new" "$pkg")
  mv -f "$BIN/$name.new" "$BIN/$name"
  echo "$want" >"$STAMPS/$name"
}

# A slim CoreDNS: the wrapper module links only the plugins the test cluster uses.
build_coredns() {
  local dir="$HACK/go/coredns"
  build_wrapper coredns github.com/coredns/coredns "$COREDNS_VERSION" . \
    "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
    "$dir/go.mod" "$dir/go.sum" "$dir/main.go"
}

# JobSet through a wrapper module: `go install sigs.k8s.io/jobset@version` reads the module's
# version list (for deprecations), which the module proxy refuses; the wrapper's go.sum is
# JobSet's own plus its module hash, so the build list is JobSet's go.mod unchanged.
build_jobset() {
  local dir="$HACK/go/jobset"
  build_wrapper jobset sigs.k8s.io/jobset "$JOBSET_VERSION" sigs.k8s.io/jobset \
    "-X sigs.k8s.io/jobset/pkg/version.GitVersion=$JOBSET_VERSION" "$dir/go.mod" "$dir/go.sum"
}

# go_install NAME BINARY MODULE/PKG VERSION [LDFLAGS]: `go install` into the bin dir.
go_install() {
  local name=$1 binary=$2 pkg=$3 version=$4 ldflags="-s -w ${5:-}" want
  want=$(key "$name" "$pkg@$version" "$ldflags")
  if fresh "$want" "$name" "$binary"; then
    log "$name $version: up to date"
    return
  fi
  log "$name $version: go install $pkg@$version"
  GOBIN="$BIN" go install -p "$JOBS" -trimpath -ldflags "$ldflags" "$pkg@$version"
  echo "$want" >"$STAMPS/$name"
}

# module_dir MODULE@VERSION: where the Go module cache holds a module's source.
module_dir() {
  go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

# The PyTorchJob CRD ships in the training-operator module, Kueue's CRDs and webhook
# configuration in Kueue's; copy them next to the binaries.
copy_crds() {
  local dir
  dir=$(module_dir "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION")
  mkdir -p "$BIN/crds/kueue"
  install -m 0644 "$dir/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$BIN/crds/"
  dir=$(module_dir "sigs.k8s.io/kueue@$KUEUE_VERSION")
  install -m 0644 "$dir"/config/components/crd/bases/*.yaml "$BIN/crds/kueue/"
  install -m 0644 "$dir/config/components/webhook/manifests.yaml" "$BIN/crds/kueue-webhooks.yaml"
  # Trainer v2: TrainJob, TrainingRuntime, ClusterTrainingRuntime; JobSet: the JobSet CRD.
  dir=$(module_dir "github.com/kubeflow/trainer/v2@$TRAINER_VERSION")
  mkdir -p "$BIN/crds/trainer"
  install -m 0644 "$dir"/manifests/base/crds/trainer.kubeflow.org_*.yaml "$BIN/crds/trainer/"
  install -m 0644 "$dir/manifests/base/webhook/manifests.yaml" "$BIN/crds/trainer-webhooks.yaml"
  dir=$(module_dir "sigs.k8s.io/jobset@$JOBSET_VERSION")
  install -m 0644 "$dir/config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml" \
    "$BIN/crds/trainer/"
  install -m 0644 "$dir/config/components/webhook/manifests.yaml" "$BIN/crds/jobset-webhooks.yaml"
}

# Volcano publishes its CRDs only in volcano.sh/volcano; generate the PodGroup and Queue CRDs
# from the volcano.sh/apis types (their kubebuilder markers) with controller-gen, as Volcano does.
volcano_crds() {
  local want out=$BIN/crds/volcano work
  want=$(key volcano-crds "$VOLCANO_APIS_VERSION" "$CONTROLLER_TOOLS_VERSION")
  if [[ -f "$out/scheduling.volcano.sh_podgroups.yaml" && -f "$STAMPS/volcano-crds" &&
    "$(cat "$STAMPS/volcano-crds")" == "$want" ]]; then
    log "volcano CRDs $VOLCANO_APIS_VERSION: up to date"
    return
  fi
  log "volcano CRDs $VOLCANO_APIS_VERSION: controller-gen"
  work=$(mktemp -d)
  (
    cd "$work"
    go mod init kubetron-volcano-crds >/dev/null 2>&1
    printf 'package tools\n\nimport _ "volcano.sh/apis/pkg/apis/scheduling/v1beta1"\n' >tools.go
    go get "volcano.sh/apis@$VOLCANO_APIS_VERSION"
    go mod tidy
    rm -rf "$out" && mkdir -p "$out"
    "$BIN/controller-gen" crd paths=volcano.sh/apis/pkg/apis/scheduling/v1beta1 \
      "output:crd:dir=$out"
  )
  rm -rf "$work"
  echo "$want" >"$STAMPS/volcano-crds"
}

wait_kube() {
  [[ -n "$KUBE_PID" ]] || return 0
  log "waiting for the kubernetes build (pid $KUBE_PID)"
  if ! wait "$KUBE_PID"; then
    log "kubernetes build failed; last lines of $LOGS/kube.log:"
    tail -n 40 "$LOGS/kube.log" >&2
    exit 1
  fi
  KUBE_PID=""
  log "kubernetes $KUBERNETES_VERSION: built"
}

main() {
  local start=$SECONDS
  # Debian packages of the real worker node and of the image build (containerd, runc, CNI
  # plugins, iptables, conntrack, buildah, mmdebstrap): apt-get only when one is missing.
  bash "$HACK/install-node-deps.sh"
  start_kube
  build_etcd
  build_coredns
  go_install kwok kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
  go_install training-operator training-operator.v1 \
    github.com/kubeflow/training-operator/cmd/training-operator.v1 "$TRAINING_OPERATOR_VERSION"
  # helm's offline default Kubernetes version is 1.20; make it the version we build, so
  # `helm template` and `helm lint` accept charts with a recent kubeVersion.
  local kminor=${KUBERNETES_VERSION#v1.}
  kminor=${kminor%%.*}
  go_install helm helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
     -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
     -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kminor \
     -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
     -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kminor"
  # Kueue (about 4 minutes cold on 2 cores): the real queueing and admission for the cluster
  # tests of spec.scheduling (tests/cluster/test_kueue.py).
  go_install kueue kueue sigs.k8s.io/kueue/cmd/kueue "$KUEUE_VERSION" \
    "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
  # Kubeflow Trainer v2 and JobSet (the TrainJob backend; tests/cluster/test_trainjob.py):
  # cold on 2 shared cores about 1.5 minutes for the trainer and 2.5-4 for JobSet.
  go_install trainer trainer-controller-manager \
    github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager "$TRAINER_VERSION"
  build_jobset
  go_install controller-tools controller-gen sigs.k8s.io/controller-tools/cmd/controller-gen \
    "$CONTROLLER_TOOLS_VERSION"
  copy_crds
  volcano_crds
  wait_kube
  cp -f "$HACK/versions.env" "$BIN/versions.env"
  log "done in $((SECONDS - start))s"
  (cd "$BIN" && du -h -- * | sed 's/^/build-tools:   /' >&2)
  echo "$BIN"
}

main "$@"
