#!/usr/bin/env bash
# Build kubetron's container images from the project's own Dockerfile without a Docker daemon
# (buildah), for the node's containerd in the cluster tests:
#   bash hack/build-images.sh [operator|trainer|pause|all]    (default: all)
#   bash hack/build-images.sh verify   import every archive into a throwaway containerd and run it
#   bash hack/build-images.sh clean    remove buildah's storage ($KUBETRON_CACHE/buildah)
#
# Images (OCI archives under $KUBETRON_CACHE/images/, each annotated with the reference pods use):
#   python-base  localhost/kubetron/python-base:<hash>   buildah storage only: Debian trixie from
#                mmdebstrap with a venv on PATH (/opt/python), so `python` and `pip install` work
#                as in python:*-slim; the base of the two images below.
#   operator     ghcr.io/kubetron/operator:<version>       operator.oci.tar    (Dockerfile: operator)
#   trainer      ghcr.io/kubetron/trainer:<version>-cpu    trainer-cpu.oci.tar (Dockerfile: trainer,
#                PyPI torch pinned by requirements-constraints.txt; the GPU build stays NGC's)
#   pause        localhost/kubetron/pause:<PAUSE_VERSION>  pause.oci.tar (hack/go/pause, static Go)
# $KUBETRON_CACHE/images/images.json lists them: [{"name": ref, "archive": path,
# "inputs": sha256, "size": bytes}, ...]; `ctr -n k8s.io images import <archive>` names the image.
#
# Idempotent and cached by content: each archive has a stamp (<archive>.inputs) holding a hash of
# everything it is built from (Dockerfile, pyproject.toml, README.md, the files under api/ and the
# image's own operator/ or trainer/ by content, untracked ones included, no bytecode;
# requirements-constraints.txt for the trainer; the base's recipe; this script's RECIPE); the image carries it as the label
# io.kubetron.inputs. A run with nothing changed only recomputes hashes (well under a second).
# Within a rebuild buildah's layer cache keeps the dependency layer (torch, megatron-core) unless
# pyproject.toml or the pins change. pip's cache is a build cache mount under buildah/tmp (it
# stays empty behind a proxy that strips Cache-Control, as here: then every deps layer rebuild
# downloads again).
#
# Everything lives under $KUBETRON_CACHE: buildah's storage (overlay driver) in buildah/, logs in
# logs/image-<name>.log. Needs root, buildah, mmdebstrap and go (hack/install-node-deps.sh).
set -euo pipefail

HACK=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HACK/.." && pwd)
# shellcheck source=hack/tools-env.sh
source "$HACK/tools-env.sh"
IMAGES=$KUBETRON_CACHE/images
LOGS=$KUBETRON_CACHE/logs
BUILDAH_DIR=$KUBETRON_CACHE/buildah
# Bump to force a rebuild of every image when this script's build recipe changes.
RECIPE=1
# Layers in the archives: 1 = gzip (default), 0 = uncompressed. Measured on 2 busy cores for the
# trainer: export 40 s vs 37 s, containerd import+unpack 72 s vs 60 s, archive 3.0 GB vs 5.5 GB
# (and as much again in containerd's content store): too little time saved for the space.
COMPRESS=${KUBETRON_IMAGE_COMPRESS:-1}

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1)
OPERATOR_REF=ghcr.io/kubetron/operator:$VERSION
TRAINER_REF=ghcr.io/kubetron/trainer:$VERSION-cpu
PAUSE_VERSION=1.0
PAUSE_REF=localhost/kubetron/pause:$PAUSE_VERSION
BASE_REPO=localhost/kubetron/python-base

# The base's recipe: Debian 13 (Python 3.13) minbase from mmdebstrap, no docs, a venv on PATH.
BASE_SUITE=trixie
BASE_SOURCES=(
  "deb http://deb.debian.org/debian $BASE_SUITE main"
  "deb http://deb.debian.org/debian $BASE_SUITE-updates main"
  "deb http://deb.debian.org/debian-security $BASE_SUITE-security main"
)
BASE_PACKAGES=python3,python3-venv,ca-certificates
BASE_VENV=/opt/python
BASE_MMDEBSTRAP=(
  --variant=minbase --include="$BASE_PACKAGES" --skip=output/dev
  --aptopt='APT::Install-Recommends "false"'
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --customize-hook="chroot \"\$1\" python3 -m venv $BASE_VENV"
  --customize-hook="chroot \"\$1\" $BASE_VENV/bin/python -m pip --version"
)
BASE_ENV=(
  "PATH=$BASE_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "LANG=C.UTF-8"
)

log() { echo "build-images: $*" >&2; }
die() {
  log "$*"
  exit 1
}

# Everything buildah keeps (images, layers, the pip cache mount, temp files) stays in one dir.
# containers/image also writes a blob-info cache to /var/lib/containers/cache with no option to
# move it (buildah 1.28), so buildah runs in a private mount namespace whose /var/lib is an overlay
# of the real one with its upper layer in $BUILDAH_DIR/varlib: the host's /var/lib stays untouched,
# and the build's own overlay mounts vanish with the namespace.
bh() {
  mkdir -p "$BUILDAH_DIR/varlib/upper" "$BUILDAH_DIR/varlib/work"
  # shellcheck disable=SC2016 # $1 and $@ are the inner shell's arguments
  unshare --mount --propagation private -- sh -c '
    mount -t overlay kubetron-varlib -o "lowerdir=/var/lib,upperdir=$1/upper,workdir=$1/work" \
      /var/lib && shift && exec "$@"' sh "$BUILDAH_DIR/varlib" \
    buildah --root "$BUILDAH_DIR/storage" --runroot "$BUILDAH_DIR/run" --storage-driver overlay "$@"
}
export TMPDIR=$BUILDAH_DIR/tmp # buildah's RUN --mount=type=cache dirs and temp files go here
export BUILDAH_ISOLATION=chroot GOTOOLCHAIN=local

# sha256 of the given strings and files; directories count by the content of their files (as the
# build context sees them: no caches, no bytecode), so mtimes and untracked-ness do not matter.
inputs_hash() {
  local part
  {
    echo "recipe=$RECIPE"
    for part in "$@"; do
      if [[ -d "$part" ]]; then
        (cd "$part" && find . \( -name __pycache__ -o -name '*.egg-info' -o -name .mypy_cache \
          -o -name .ruff_cache -o -name .pytest_cache \) -prune -o -type f ! -name '*.pyc' -print0 |
          LC_ALL=C sort -z | xargs -0 -r sha256sum)
      elif [[ -f "$part" ]]; then
        echo "file ${part#"$ROOT"/} $(sha256sum <"$part" | cut -d' ' -f1)"
      else
        echo "$part"
      fi
    done
  } | sha256sum | cut -d' ' -f1
}

# fresh FILE HASH -> true when the archive exists and its stamp holds HASH.
fresh() {
  [[ -f "$IMAGES/$1" && -f "$IMAGES/$1.inputs" && "$(cat "$IMAGES/$1.inputs")" == "$2" ]]
}

human() { numfmt --to=iec --suffix=B "$1"; }

# fail NAME: report which image failed with the tail of its log, then exit.
fail() {
  local name=$1 logfile="$LOGS/image-$1.log"
  log "$name: FAILED; last lines of $logfile:"
  tail -n 40 "$logfile" >&2 || true
  exit 1
}

# Archives are written by buildah's commit (the build's last step, or `buildah commit`) straight
# to oci-archive:<file>.tmp:<ref>, not by `buildah push`, which always gzips OCI destinations
# (buildah 1.28 drops --disable-compression there). done_archive FILE HASH: move in place, stamp.
archive_flags() { if [[ "$COMPRESS" == 1 ]]; then echo --disable-compression=false; else echo -D; fi; }
done_archive() {
  mv -f "$IMAGES/$1.tmp" "$IMAGES/$1"
  echo "$2" >"$IMAGES/$1.inputs"
}

# ---------------------------------------------------------------- python base (buildah only)
base_hash() {
  inputs_hash base "$BASE_SUITE" "${BASE_SOURCES[@]}" "${BASE_MMDEBSTRAP[@]}" "${BASE_ENV[@]}"
}

# ensure_base: the base image exists in buildah storage (built from its recipe when missing).
ensure_base() {
  local hash ref start logfile="$LOGS/image-python-base.log" work ctr
  hash=$(base_hash)
  ref=$BASE_REPO:${hash:0:16}
  BASE_REF=$ref
  if bh inspect --type image "$ref" >/dev/null 2>&1; then
    log "python-base: up to date ($ref)"
    return
  fi
  start=$SECONDS
  log "python-base: mmdebstrap $BASE_SUITE (log: $logfile)"
  work=$(mktemp -d "$TMPDIR/base.XXXXXX")
  {
    mmdebstrap "${BASE_MMDEBSTRAP[@]}" "$BASE_SUITE" "$work/rootfs.tar" "${BASE_SOURCES[@]}" &&
      ctr=$(bh from scratch) &&
      bh add "$ctr" "$work/rootfs.tar" / &&
      bh config --os linux --arch amd64 --cmd '["python3"]' \
        "${BASE_ENV[@]/#/--env=}" --label "io.kubetron.inputs=$hash" \
        --label org.opencontainers.image.title=kubetron-python-base "$ctr" &&
      bh commit --rm "$ctr" "$ref"
  } >"$logfile" 2>&1 || {
    rm -rf "$work"
    fail python-base
  }
  rm -rf "$work"
  log "python-base: built $ref in $((SECONDS - start))s"
}

# ---------------------------------------------------------------- images
# requirements-constraints.txt's pins as one line: "torch==2.14.1 megatron-core==0.19.2".
pins() { sed -e 's/#.*//' "$ROOT/requirements-constraints.txt" | xargs; }

image_hash() {
  local name=$1
  shift
  inputs_hash "$name" "$(base_hash)" "compress=$COMPRESS" "$@" "$ROOT/Dockerfile" \
    "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/api"
}

# build NAME REF FILE HASH BUILDAH-BUILD-ARGS...: Dockerfile target -> archive, unless fresh.
build() {
  local name=$1 ref=$2 file=$3 hash=$4 start size logfile="$LOGS/image-$1.log"
  shift 4
  if fresh "$file" "$hash"; then
    log "$name: up to date ($ref, $(human "$(stat -c %s "$IMAGES/$file")"))"
    return
  fi
  ensure_base
  start=$SECONDS
  log "$name: building $ref (log: $logfile)"
  local mounts=()
  # The host's CA bundle (a TLS-intercepting proxy) for pip, only while building: it is mounted
  # over the image's own bundle, so the image keeps Debian's (pip >= 24.2 uses the system store).
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  fi
  rm -f "$IMAGES/$file.tmp"
  bh build --layers --pull=never --network host "${mounts[@]}" "$(archive_flags)" \
    -f "$ROOT/Dockerfile" --label "io.kubetron.inputs=$hash" \
    -t "oci-archive:$IMAGES/$file.tmp:$ref" "$@" "$ROOT" >"$logfile" 2>&1 || fail "$name"
  done_archive "$file" "$hash"
  size=$(stat -c %s "$IMAGES/$file")
  log "$name: done in $((SECONDS - start))s ($(human "$size"))"
}

build_operator() {
  ensure_base_ref
  build operator "$OPERATOR_REF" operator.oci.tar "$(image_hash operator "$OPERATOR_REF" "$ROOT/operator")" \
    --target operator --build-arg "PYTHON_IMAGE=$BASE_REF"
}

build_trainer() {
  local pins
  pins=$(pins)
  ensure_base_ref
  build trainer "$TRAINER_REF" trainer-cpu.oci.tar \
    "$(image_hash trainer "$TRAINER_REF" "$pins" "$ROOT/requirements-constraints.txt" \
      "$ROOT/trainer")" \
    --target trainer --build-arg "TRAINER_BASE=$BASE_REF" --build-arg "TRAINER_PINS=$pins"
}

# BASE_REF without touching buildah (build() builds the base only when an image is stale).
ensure_base_ref() {
  local hash
  hash=$(base_hash)
  BASE_REF=$BASE_REPO:${hash:0:16}
}

build_pause() {
  local file=pause.oci.tar hash start logfile="$LOGS/image-pause.log" work ctr
  hash=$(inputs_hash pause "$PAUSE_REF" "$(go env GOVERSION)" "compress=$COMPRESS" \
    "$HACK/go/pause/go.mod" "$HACK/go/pause/main.go")
  if fresh "$file" "$hash"; then
    log "pause: up to date ($PAUSE_REF, $(human "$(stat -c %s "$IMAGES/$file")"))"
    return
  fi
  start=$SECONDS
  log "pause: building $PAUSE_REF (log: $logfile)"
  work=$(mktemp -d "$TMPDIR/pause.XXXXXX")
  rm -f "$IMAGES/$file.tmp"
  {
    (cd "$HACK/go/pause" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/pause" .) &&
      ctr=$(bh from scratch) &&
      bh copy --chmod 0755 "$ctr" "$work/pause" /pause &&
      bh config --os linux --arch amd64 --entrypoint '["/pause"]' --user 65535:65535 \
        --label "io.kubetron.inputs=$hash" --label org.opencontainers.image.title=kubetron-pause \
        "$ctr" &&
      bh commit --rm "$(archive_flags)" "$ctr" "oci-archive:$IMAGES/$file.tmp:$PAUSE_REF"
  } >"$logfile" 2>&1 || {
    rm -rf "$work"
    fail pause
  }
  rm -rf "$work"
  done_archive "$file" "$hash"
  log "pause: done in $((SECONDS - start))s ($(human "$(stat -c %s "$IMAGES/$file")"))"
}

# images.json: every archive present, with the reference it is named, its inputs hash and size.
write_index() {
  local entries=() file ref
  for file in pause.oci.tar operator.oci.tar trainer-cpu.oci.tar; do
    case $file in
    pause.*) ref=$PAUSE_REF ;;
    operator.*) ref=$OPERATOR_REF ;;
    trainer-cpu.*) ref=$TRAINER_REF ;;
    esac
    [[ -f "$IMAGES/$file" && -f "$IMAGES/$file.inputs" ]] || continue
    entries+=("$(printf '  {"name": "%s", "archive": "%s", "inputs": "%s", "size": %s}' \
      "$ref" "$IMAGES/$file" "$(cat "$IMAGES/$file.inputs")" "$(stat -c %s "$IMAGES/$file")")")
  done
  {
    echo "["
    local i
    for i in "${!entries[@]}"; do
      if ((i + 1 < ${#entries[@]})); then echo "${entries[$i]},"; else echo "${entries[$i]}"; fi
    done
    echo "]"
  } >"$IMAGES/images.json.tmp"
  mv -f "$IMAGES/images.json.tmp" "$IMAGES/images.json"
}

# buildah's runroot lives on disk (so teardown is one dir); after a reboot its mount counts are
# stale, so start it afresh. Nothing of this boot can be mounted from it then.
reset_stale_runroot() {
  local boot
  boot=$(cat /proc/sys/kernel/random/boot_id)
  if [[ -d "$BUILDAH_DIR/run" && "$(cat "$BUILDAH_DIR/run/.boot_id" 2>/dev/null)" != "$boot" ]]; then
    rm -rf "$BUILDAH_DIR/run"
  fi
  mkdir -p "$BUILDAH_DIR/run"
  echo "$boot" >"$BUILDAH_DIR/run/.boot_id"
}

# ---------------------------------------------------------------- verify (throwaway containerd)
# verify: a containerd of its own (root, state and sockets in a temp dir; nothing on TCP but CRI's
# stream server on 127.0.0.1), then for each archive: import, check the name, run a check. On
# exit (also on failure) it stops the containers and containerd, unmounts and removes the dir.
V_TMP="" V_PID="" V_RUN_EXISTED=0
V_CTR=()

verify_cleanup() {
  local c ctrs=()
  if [[ -n "$V_PID" ]]; then
    mapfile -t ctrs < <("${V_CTR[@]}" containers ls -q 2>/dev/null)
    for c in "${ctrs[@]}"; do
      "${V_CTR[@]}" task kill -s SIGKILL "$c" >/dev/null 2>&1 || true
      "${V_CTR[@]}" task delete "$c" >/dev/null 2>&1 || true
      "${V_CTR[@]}" container delete "$c" >/dev/null 2>&1 || true
    done
    kill "$V_PID" 2>/dev/null && wait "$V_PID" 2>/dev/null || true
    V_PID=""
  fi
  if [[ -n "$V_TMP" ]]; then
    findmnt -rn -o TARGET | grep "^$V_TMP/" | sort -r | xargs -r umount || true
    rm -rf "$V_TMP"
  fi
  # Shim sockets, ctr's fifos and runc's state go to fixed dirs under /run/containerd (emptied
  # when the containers are deleted); remove those dirs too if this run created them.
  if ((V_RUN_EXISTED == 0)); then
    rmdir /run/containerd/{s,fifo,runc/k8s.io,runc} /run/containerd 2>/dev/null || true
  fi
}

# vcheck NAME ARCHIVE REF CMD...: import ARCHIVE, check that REF exists, run CMD, report.
vcheck() {
  local name=$1 archive=$2 ref=$3 start=$SECONDS out
  shift 3
  [[ -f "$archive" ]] || return 0
  out=$("${V_CTR[@]}" images import "$archive" 2>&1) || {
    log "verify $name: import of $archive FAILED: $out"
    return 1
  }
  "${V_CTR[@]}" images ls -q | grep -qxF "$ref" || {
    log "verify $name: $ref is not among the imported images"
    return 1
  }
  out=$("$@" 2>&1) || {
    log "verify $name: FAILED: $out"
    return 1
  }
  log "verify $name: $ref imported and ran in $((SECONDS - start))s: $(echo "$out" | tail -n 1)"
}

verify() {
  local rc=0 sock c
  command -v containerd >/dev/null || die "verify needs containerd and ctr"
  [[ -f "$IMAGES/images.json" ]] || die "no images.json: build first"
  [[ -d /run/containerd ]] && V_RUN_EXISTED=1
  trap verify_cleanup EXIT
  V_TMP=$(mktemp -d /tmp/kubetron-verify.XXXXXX)
  sock=$V_TMP/containerd.sock
  cat >"$V_TMP/config.toml" <<EOF
version = 2
root = "$V_TMP/root"
state = "$V_TMP/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$V_TMP/containerd.ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$V_TMP/opt"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = "$PAUSE_REF"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$V_TMP/cni/bin"
    conf_dir = "$V_TMP/cni/conf"
EOF
  containerd --config "$V_TMP/config.toml" >"$LOGS/image-verify-containerd.log" 2>&1 &
  V_PID=$!
  V_CTR=(ctr --address "$sock" -n k8s.io)
  for _ in $(seq 100); do
    "${V_CTR[@]}" version >/dev/null 2>&1 && break
    sleep 0.1
  done
  "${V_CTR[@]}" version >/dev/null || die "containerd did not start: $LOGS/image-verify-containerd.log"
  c="${V_CTR[*]}"
  vcheck pause "$IMAGES/pause.oci.tar" "$PAUSE_REF" bash -c "
    $c run -d $PAUSE_REF kubetron-verify-pause >/dev/null && sleep 1 &&
    $c task kill -s SIGTERM kubetron-verify-pause && sleep 1 &&
    $c task delete kubetron-verify-pause && $c container delete kubetron-verify-pause &&
    echo 'pause exited 0 on SIGTERM'" || rc=1
  vcheck operator "$IMAGES/operator.oci.tar" "$OPERATOR_REF" \
    "${V_CTR[@]}" run --rm "$OPERATOR_REF" kubetron-verify-operator sh -c \
    'kubetron-operator --help | grep -q -- --leader-elect && python -c "
import importlib.util, os
assert importlib.util.find_spec(\"torch\") is None, \"torch is installed\"
print(\"kubetron-operator --help ok, no torch, uid\", os.getuid())"' || rc=1
  vcheck trainer "$IMAGES/trainer-cpu.oci.tar" "$TRAINER_REF" \
    "${V_CTR[@]}" run --rm "$TRAINER_REF" kubetron-verify-trainer python -c \
    "import os, torch, megatron.core, kubetron_trainer; print('torch', torch.__version__, 'uid', os.getuid())" || rc=1
  verify_cleanup
  trap - EXIT
  ((rc == 0)) || die "verify failed (containerd log: $LOGS/image-verify-containerd.log)"
  log "verify: every image imported and ran; containerd stopped, $V_TMP removed"
}

clean() {
  findmnt -rn -o TARGET | grep "^$BUILDAH_DIR/" | sort -r | xargs -r umount || true
  rm -rf "$BUILDAH_DIR"
  log "removed $BUILDAH_DIR (archives in $IMAGES kept)"
}

# prune_cache: remove the buildah images no current archive was built from (hack/prune-buildah.py):
# old generations of the layer cache, gigabytes each time the trainer's dependencies change.
prune_cache() {
  local ids before after
  # shellcheck disable=SC2046 # one hash per stamp file
  ids=$(for id in $(bh images -a -q --no-trunc 2>/dev/null); do
    id=${id#sha256:}
    echo "$id $(bh inspect --type image --format '{{index .OCIv1.Config.Labels "io.kubetron.inputs"}}' "$id" 2>/dev/null)"
  done | python3 "$ROOT/hack/prune-buildah.py" "$BUILDAH_DIR/storage" $(cat "$IMAGES"/*.inputs 2>/dev/null))
  [[ -n "$ids" ]] || return 0
  before=$(du -sm "$BUILDAH_DIR" | cut -f1)
  # shellcheck disable=SC2086 # one id per word
  bh rmi $ids >/dev/null 2>&1 || log "prune: some old layer-cache images could not be removed"
  after=$(du -sm "$BUILDAH_DIR" | cut -f1)
  log "prune: removed $(wc -w <<<"$ids") old layer-cache images ($((before - after)) MB freed)"
}

main() {
  local what=${1:-all} start=$SECONDS
  case $what in
  operator | trainer | pause | all | verify | clean) ;;
  *) die "usage: $0 [operator|trainer|pause|all|verify|clean]" ;;
  esac
  [[ $EUID -eq 0 ]] || die "needs root (buildah's overlay storage, mmdebstrap)"
  mkdir -p "$IMAGES" "$LOGS" "$TMPDIR"
  exec 9>"$IMAGES/.lock"
  flock 9
  case $what in
  verify) verify && return ;;
  clean) clean && return ;;
  esac
  reset_stale_runroot
  case $what in
  pause) build_pause ;;
  operator) build_operator ;;
  trainer) build_trainer ;;
  all) build_pause && build_operator && build_trainer ;;
  esac
  write_index
  prune_cache
  log "$what: done in $((SECONDS - start))s; $IMAGES/images.json"
}

main "$@"
