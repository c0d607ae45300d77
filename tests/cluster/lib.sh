# Shared settings for the local test cluster scripts (sourced, not executed).
# shellcheck shell=bash disable=SC2034

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Pinned versions. The Rust side uses the k8s-openapi feature v1_35.
K8S_VERSION="${ENBI_K8S_VERSION:-v1.35.4}"
KWOK_VERSION="${ENBI_KWOK_VERSION:-v0.8.0}"
ETCD_VERSION="${ENBI_ETCD_VERSION:-v3.6.16}"
# The CNCF registry (github.com/distribution/distribution/v3), see ./registry.
REGISTRY_VERSION="${ENBI_REGISTRY_VERSION:-v3.1.1}"
# The real nodes' containerd (github.com/containerd/containerd/v2, built into the cache).
CONTAINERD_VERSION="${ENBI_CONTAINERD_VERSION:-v2.4.2}"
# The runc the real nodes' containerd 2.x runs (github.com/opencontainers/runc, built into the
# cache): user-namespaced Pods (`hostUsers: false`) need runc >= 1.2; Debian bookworm has 1.1.5.
RUNC_VERSION="${ENBI_RUNC_VERSION:-v1.5.3}"
# Spegel, the P2P image mirror the real nodes run (./spegel).
SPEGEL_VERSION="${ENBI_SPEGEL_VERSION:-v0.7.4}"

# Binary cache, outside the checkout, keyed by component and version.
ENBI_CACHE="${ENBI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/enbi}"
BIN_CACHE="$ENBI_CACHE/bin"
K8S_BIN="$BIN_CACHE/kubernetes-$K8S_VERSION"
KWOK_BIN="$BIN_CACHE/kwok-$KWOK_VERSION"
ETCD_BIN="$BIN_CACHE/etcd-$ETCD_VERSION"
REGISTRY_BIN="$BIN_CACHE/registry-$REGISTRY_VERSION"
CONTAINERD_BIN="$BIN_CACHE/containerd-$CONTAINERD_VERSION"
RUNC_BIN="$BIN_CACHE/runc-$RUNC_VERSION"
SPEGEL_BIN="$BIN_CACHE/spegel-$SPEGEL_VERSION"
# kwok-images is built from ./kwok-images; keyed by a hash of its sources.
KWOK_IMAGES_HASH="$(cat "$CLUSTER_DIR"/kwok-images/{go.mod,go.sum,*.go} | sha256sum | cut -c1-12)"
KWOK_IMAGES_BIN="$BIN_CACHE/kwok-images-$KWOK_IMAGES_HASH"

# Runtime state (certs, kubeconfigs, data, logs, pid files).
STATE_DIR="${ENBI_CLUSTER_STATE:-$CLUSTER_DIR/.state}"
LOG_DIR="$STATE_DIR/logs"
PID_DIR="$STATE_DIR/pids"
KUBECONFIG_OUT="$STATE_DIR/kubeconfig"

# Loopback ports; chosen away from the usual defaults so that a developer's
# own cluster (6443, 2379, 10250, ...) does not clash. Each ENBI_*_PORT sets one; the others
# are the defaults plus a port offset: ENBI_PORT_OFFSET, else the one `up` recorded in
# $STATE_DIR/port-offset when it found a default port taken (a second cluster on this machine),
# else 0. The kubelets' ports are in the nodes' own network namespaces: never offset.
PORT_OFFSET_FILE="$STATE_DIR/port-offset"
set_ports() { # OFFSET
  PORT_OFFSET="$1"
  ETCD_CLIENT_PORT="${ENBI_ETCD_CLIENT_PORT:-$((23790 + PORT_OFFSET))}"
  ETCD_PEER_PORT="${ENBI_ETCD_PEER_PORT:-$((23800 + PORT_OFFSET))}"
  ETCD_METRICS_PORT="${ENBI_ETCD_METRICS_PORT:-$((23810 + PORT_OFFSET))}"
  APISERVER_PORT="${ENBI_APISERVER_PORT:-$((16443 + PORT_OFFSET))}"
  KCM_PORT="${ENBI_KCM_PORT:-$((20257 + PORT_OFFSET))}"
  SCHEDULER_PORT="${ENBI_SCHEDULER_PORT:-$((20259 + PORT_OFFSET))}"
  KWOK_PORT="${ENBI_KWOK_PORT:-$((20247 + PORT_OFFSET))}"
  # The local OCI registry (plain HTTP), see ./registry.
  REGISTRY_PORT="${ENBI_REGISTRY_PORT:-$((25000 + PORT_OFFSET))}"
  REGISTRY_ADDR="127.0.0.1:$REGISTRY_PORT"
}
# name=port of every host port of a cluster (the checks of `up`).
host_ports() {
  echo "etcd=$ETCD_CLIENT_PORT etcd=$ETCD_PEER_PORT etcd=$ETCD_METRICS_PORT kube-apiserver=$APISERVER_PORT" \
    "kube-controller-manager=$KCM_PORT kube-scheduler=$SCHEDULER_PORT kwok=$KWOK_PORT registry=$REGISTRY_PORT"
}
set_ports "${ENBI_PORT_OFFSET:-$(cat "$PORT_OFFSET_FILE" 2>/dev/null || echo 0)}"
[[ "$PORT_OFFSET" =~ ^[0-9]{1,5}$ ]] || { echo "ENBI_PORT_OFFSET must be a number" >&2; exit 1; }
KUBELET_PORT="${ENBI_KUBELET_PORT:-20250}"
KUBELET_HEALTHZ_PORT="${ENBI_KUBELET_HEALTHZ_PORT:-20248}"

SERVICE_CIDR="10.96.0.0/16"
CLUSTER_CIDR="10.244.0.0/16"
# The `kubernetes` Service's ClusterIP (the first address of SERVICE_CIDR).
APISERVER_SERVICE_IP="${SERVICE_CIDR%.0/*}.1"

# --- real nodes (tests/cluster/real-node) ---------------------------------------------------
# Every host-wide name a cluster's real nodes use (network namespaces, bridge, veths, addresses,
# cgroups, /run dirs, iptables comments) derives from CLUSTER_ID, by default a hash of the
# state directory, so that two clusters with different state dirs never clash on one machine.
CLUSTER_ID="${ENBI_CLUSTER_ID:-$(printf '%s' "$STATE_DIR" | sha256sum | cut -c1-6)}"
[[ "$CLUSTER_ID" =~ ^[a-z0-9]{1,6}$ ]] || { echo "ENBI_CLUSTER_ID must be 1-6 of [a-z0-9]" >&2; exit 1; }
REAL_NODES="${ENBI_REAL_NODES:-2}"
if ! [[ "$REAL_NODES" =~ ^[1-9][0-9]?$ ]] || ((REAL_NODES > 50)); then
  echo "ENBI_REAL_NODES must be 1..50" >&2; exit 1
fi
# The nodes' private /16 (ENBI_NODE_NET, e.g. 10.150.0.0/16): the host bridge has .0.1, node i
# .0.(10+i), node i's Pods .(i+1).0/24. By default 10.100-199 from a hash of CLUSTER_ID: clear of
# the Service CIDR (10.96), kwok's Pod CIDR (10.244) and the old single real node (10.89,
# 10.254); `real-node up` refuses a /16 that this machine already routes elsewhere.
NODE_NET="${ENBI_NODE_NET:-10.$((100 + 0x$(printf '%s' "$CLUSTER_ID" | sha256sum | cut -c1-4) % 100)).0.0/16}"
[[ "$NODE_NET" =~ ^(10\.[0-9]{1,3})\.0\.0/16$ ]] || { echo "ENBI_NODE_NET must be 10.X.0.0/16" >&2; exit 1; }
NODE_NET_PREFIX="${BASH_REMATCH[1]}"
NODE_BRIDGE="enb$CLUSTER_ID"                 # host bridge joining the nodes (<= 15 chars)
NODE_BRIDGE_IP="$NODE_NET_PREFIX.0.1"        # the host on it: where kubelets reach the apiserver
# The local registry as the real nodes (their containerd, their Pods) reach it: the host's
# address on their bridge, DNATed to $REGISTRY_ADDR (real-node's host_net_up). Image references
# that real nodes pull use this address; the host pushes to $REGISTRY_ADDR, the same registry.
REGISTRY_NODE_ADDR="$NODE_BRIDGE_IP:$REGISTRY_PORT"
# The binary cache of the cache tests (./nix-cache), where the nodes reach it, and its signing key
# pair, made once (nix_cache_key): the nodes' Nix daemon trusts both.
NIX_CACHE_URL="http://$NODE_BRIDGE_IP:${ENBI_NIX_CACHE_PORT:-$((25180 + PORT_OFFSET))}"
NIX_CACHE_DIR="$STATE_DIR/nix-cache"
nix_cache_key() {
  [[ -f "$NIX_CACHE_DIR/public-key" ]] && return
  mkdir -p "$NIX_CACHE_DIR"
  nix-store --generate-binary-cache-key enbi-test-cache-1 "$NIX_CACHE_DIR/secret-key" "$NIX_CACHE_DIR/public-key"
}
NODE_RUN_DIR="/run/enbi-$CLUSTER_ID"         # sockets and runtime state (short unix socket paths)
NODE_CGROUP_ROOT="/enbi-$CLUSTER_ID"         # parent of every node's cgroupRoot
NODE_NAT_COMMENT="enbi-$CLUSTER_ID-apiserver" # the host's iptables rules (apiserver, registry)
# Per node I (0-based): name, netns, host-side veth, IP, Pod subnet, run dir, cgroupRoot.
node_name() { echo "enbi-real-$1"; }
node_netns() { echo "enbi-$CLUSTER_ID-$1"; }
node_veth() { echo "enb$CLUSTER_ID-$1"; }
node_ip() { echo "$NODE_NET_PREFIX.0.$((10 + $1))"; }
node_pod_subnet() { echo "$NODE_NET_PREFIX.$(($1 + 1)).0/24"; }
node_run_dir() { echo "$NODE_RUN_DIR/$1"; }
node_cgroup_root() { echo "$NODE_CGROUP_ROOT/$(node_name "$1")"; }

# kube-apiserver's --feature-gates (ENBI_APISERVER_FEATURE_GATES, e.g. WatchList=false, as
# Kubernetes 1.33 ships); none by default. `up` restarts the apiserver when it changes.
APISERVER_EXTRA_ARGS=()
[[ -z "${ENBI_APISERVER_FEATURE_GATES:-}" ]] ||
  APISERVER_EXTRA_ARGS+=(--feature-gates="$ENBI_APISERVER_FEATURE_GATES")

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

# The real nodes' containerd: "build" ($CONTAINERD_VERSION built into the cache: containerd,
# ctr, containerd-shim-runc-v2) or "debian" (Debian's containerd package, 1.6 on bookworm; a
# legacy check only: containerd 1.x is end of life and Kubernetes 1.36 drops it).
CONTAINERD_SOURCE="${ENBI_CONTAINERD:-build}"
# containerd_dir: the directory holding containerd, ctr and containerd-shim-runc-v2.
containerd_dir() {
  case "$CONTAINERD_SOURCE" in
    build) echo "$CONTAINERD_BIN" ;;
    debian) dirname "$(command -v containerd || echo /usr/bin/containerd)" ;;
    *) echo "ENBI_CONTAINERD must be build or debian" >&2; return 1 ;;
  esac
}

# runc_binary: the runc the nodes' containerd runs: ENBI_RUNC if set, else $RUNC_VERSION from
# the cache with the built containerd, else Debian's (with ENBI_CONTAINERD=debian, the legacy
# check, which keeps Debian's runc 1.1.5 as bookworm ships it).
runc_binary() {
  if [[ -n "${ENBI_RUNC:-}" ]]; then
    echo "$ENBI_RUNC"
  elif [[ "$CONTAINERD_SOURCE" == build ]]; then
    echo "$RUNC_BIN/runc"
  else
    command -v runc || echo /usr/sbin/runc
  fi
}

# The real nodes' layout: where containerd's socket, its registry configuration (certs.d) and its
# root are on a node, as its kubelet, Spegel and enbi see them. "kubeadm": containerd's own
# defaults (kubeadm, EKS, most distributions); "k3s": k3s's embedded containerd. `up` records it,
# so that later calls (rejoin, spegel) keep the layout the nodes were made with.
NODE_LAYOUT="${ENBI_NODE_LAYOUT:-$(cat "$STATE_DIR/node-layout" 2>/dev/null || echo kubeadm)}"
case "$NODE_LAYOUT" in
  kubeadm)
    NODE_SOCKET_DIR=/run/containerd
    NODE_CERTS_DIR=/etc/containerd/certs.d
    NODE_CONTAINERD_ROOT=/var/lib/containerd
    ;;
  k3s)
    NODE_SOCKET_DIR=/run/k3s/containerd
    NODE_CERTS_DIR=/var/lib/rancher/k3s/agent/etc/containerd/certs.d
    NODE_CONTAINERD_ROOT=/var/lib/rancher/k3s/agent/containerd
    ;;
  *) echo "ENBI_NODE_LAYOUT must be kubeadm or k3s" >&2; exit 1 ;;
esac
NODE_SOCKET="$NODE_SOCKET_DIR/containerd.sock"

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
