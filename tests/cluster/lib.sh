# Shared settings for the local test cluster scripts (sourced, not executed).
# shellcheck shell=bash disable=SC2034

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Pinned versions. The Rust side uses the k8s-openapi feature v1_35.
K8S_VERSION="${ENBI_K8S_VERSION:-v1.35.4}"
KWOK_VERSION="${ENBI_KWOK_VERSION:-v0.8.0}"
ETCD_VERSION="${ENBI_ETCD_VERSION:-v3.6.16}"
# The CNCF registry (github.com/distribution/distribution/v3), see ./registry.
REGISTRY_VERSION="${ENBI_REGISTRY_VERSION:-v3.1.1}"

# Binary cache, outside the checkout, keyed by component and version.
ENBI_CACHE="${ENBI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/enbi}"
BIN_CACHE="$ENBI_CACHE/bin"
K8S_BIN="$BIN_CACHE/kubernetes-$K8S_VERSION"
KWOK_BIN="$BIN_CACHE/kwok-$KWOK_VERSION"
ETCD_BIN="$BIN_CACHE/etcd-$ETCD_VERSION"
REGISTRY_BIN="$BIN_CACHE/registry-$REGISTRY_VERSION"
# kwok-images is built from ./kwok-images; keyed by a hash of its sources.
KWOK_IMAGES_HASH="$(cat "$CLUSTER_DIR"/kwok-images/{go.mod,go.sum,*.go} | sha256sum | cut -c1-12)"
KWOK_IMAGES_BIN="$BIN_CACHE/kwok-images-$KWOK_IMAGES_HASH"

# Runtime state (certs, kubeconfigs, data, logs, pid files).
STATE_DIR="${ENBI_CLUSTER_STATE:-$CLUSTER_DIR/.state}"
LOG_DIR="$STATE_DIR/logs"
PID_DIR="$STATE_DIR/pids"
KUBECONFIG_OUT="$STATE_DIR/kubeconfig"

# Loopback ports; chosen away from the usual defaults so that a developer's
# own cluster (6443, 2379, 10250, ...) does not clash.
ETCD_CLIENT_PORT="${ENBI_ETCD_CLIENT_PORT:-23790}"
ETCD_PEER_PORT="${ENBI_ETCD_PEER_PORT:-23800}"
ETCD_METRICS_PORT="${ENBI_ETCD_METRICS_PORT:-23810}"
APISERVER_PORT="${ENBI_APISERVER_PORT:-16443}"
KCM_PORT="${ENBI_KCM_PORT:-20257}"
SCHEDULER_PORT="${ENBI_SCHEDULER_PORT:-20259}"
KWOK_PORT="${ENBI_KWOK_PORT:-20247}"
KUBELET_PORT="${ENBI_KUBELET_PORT:-20250}"
KUBELET_HEALTHZ_PORT="${ENBI_KUBELET_HEALTHZ_PORT:-20248}"
# The local OCI registry (plain HTTP), see ./registry.
REGISTRY_PORT="${ENBI_REGISTRY_PORT:-25000}"
REGISTRY_ADDR="127.0.0.1:$REGISTRY_PORT"

SERVICE_CIDR="10.96.0.0/16"
CLUSTER_CIDR="10.244.0.0/16"

# etcd: "system" (Debian's etcd-server, /usr/bin/etcd) or "build" ($ETCD_VERSION
# built from go.etcd.io/etcd/server/v3 into the cache).
ETCD_SOURCE="${ENBI_ETCD:-build}"
ETCD_EXTRA_ARGS=()
# Test data only: skip fsync for speed (flag exists since etcd 3.5).
[[ "$ETCD_SOURCE" == build ]] && ETCD_EXTRA_ARGS+=(--unsafe-no-fsync)
etcd_binary() {
  case "$ETCD_SOURCE" in
    system) command -v etcd || { [[ -x /usr/bin/etcd ]] && echo /usr/bin/etcd; } ;;
    build) [[ -x "$ETCD_BIN/etcd" ]] && echo "$ETCD_BIN/etcd" ;;
    *) echo "ENBI_ETCD must be system or build" >&2; return 1 ;;
  esac
}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# is_running NAME: the pid file's process is alive and is one of ours.
is_running() {
  local pidfile="$PID_DIR/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$STATE_DIR"
}

# stop_process NAME: SIGTERM, then SIGKILL after 10 s.
stop_process() {
  local name="$1" pid
  if is_running "$name"; then
    pid="$(cat "$PID_DIR/$name.pid")"
    log "$name: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      is_running "$name" || break
      sleep 0.2
    done
    if is_running "$name"; then
      log "$name: still running, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$PID_DIR/$name.pid" "$PID_DIR/$name.fingerprint"
}
