#!/usr/bin/env bash
# Do the nodes' disks stay flat over many rollouts? N rollouts of a Deployment with one Pod on
# each of the two real nodes, each revision a new image (the fixture flake salted: 50 MiB of new
# random layer data) under a new tag, as README recommends.
#
# Usage: bench/rollouts.sh [N]     (default 20)
#
# Needs root and the local cluster with its real nodes (tests/cluster/up --real-node). Spegel is
# taken off the nodes, so that enbi puts every image on both nodes itself (a build on one, a
# load on the other). The operator keeps 1 Succeeded NixBuild per namespace and collects one
# as soon as no Pod uses its image (--retain-after-last-use-seconds 0): each revision's old
# NixBuild is deleted once its Pods are gone, and its image released on both nodes.
# After each rollout it prints, per node, the bytes in containerd's content store and the
# number of this bench's images there; and at the end the build Jobs per revision (1.0: no
# rebuild caused by history limits). Set ENBI_BIN to use a prebuilt operator binary.
set -euo pipefail
cd "$(dirname "$0")/.."
rollouts=${1:-20}
# shellcheck source=../tests/cluster/lib.sh
source tests/cluster/lib.sh
export KUBECONFIG="$KUBECONFIG_OUT"
KUBECTL="$K8S_BIN/kubectl"
k() { "$KUBECTL" "$@"; }
[[ $EUID -eq 0 ]] || { echo "bench/rollouts.sh needs root (the real nodes)" >&2; exit 1; }
mapfile -t nodes < <(tests/cluster/real-node nodes)
((${#nodes[@]} >= 2)) || { echo "needs two real nodes: tests/cluster/up --real-node" >&2; exit 1; }

if [[ -z "${ENBI_BIN:-}" ]]; then
  cargo build -q --release -p enbi-operator
  ENBI_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/enbi-operator"
fi
BUILDER=localhost/enbi:bench-rollouts
REPO=enbi.test/rollouts
tests/cluster/real-node builder-image "$ENBI_BIN" "$BUILDER" 2>/dev/null
"$ENBI_BIN" crd | k apply --server-side --force-conflicts --field-manager=enbi-bench -f - >/dev/null
k wait --for=condition=Established crd/nixbuilds.enbi.hrzn.ee >/dev/null
system=$( [[ $(uname -m) == aarch64 ]] && echo aarch64-linux || echo x86_64-linux )
repel="$(k get nodes -l type=kwok -o name | sed 's|node/||' | paste -sd,)"
ctr_on() { "$(containerd_dir)/ctr" --address "$(tests/cluster/real-node socket "$1")" -n k8s.io "${@:2}" 2>/dev/null; }

NS=enbi-bench-rollouts BNS=enbi-bench-rollouts-builds
work="$(mktemp -d)"
op_pid=
cleanup() {
  [[ -n "$op_pid" ]] && { kill "$op_pid" 2>/dev/null || true; wait "$op_pid" 2>/dev/null || true; }
  tests/cluster/real-node spegel on 2>/dev/null || true
  for nb in $(k -n "$NS" get nixbuilds -o name 2>/dev/null); do
    k -n "$NS" patch "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null
  done
  k delete ns "$NS" "$BNS" --ignore-not-found --wait=false >/dev/null
  for node in "${nodes[@]}"; do
    mapfile -t ours < <(ctr_on "$node" images ls -q 2>/dev/null | grep "^$REPO" || true)
    ((${#ours[@]} == 0)) || ctr_on "$node" images rm "${ours[@]}" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

k delete ns "$NS" "$BNS" --ignore-not-found --wait >/dev/null
k create ns "$NS" >/dev/null
k label ns "$NS" enbi.hrzn.ee/pod-builds=enabled >/dev/null
k create ns "$BNS" >/dev/null
k -n "$BNS" create serviceaccount enbi-builder >/dev/null
k -n "$NS" wait --for=jsonpath='{.metadata.name}'=default serviceaccount/default --timeout=30s >/dev/null
tests/cluster/real-node spegel off 2>/dev/null
RUST_LOG=warn "$ENBI_BIN" run --build-namespace "$BNS" --builder-image "$BUILDER" \
  --store-mode node-daemon --builder-tolerations enbi.test/real-node --node-repel "$repel" \
  --listen-address 127.0.0.1:18092 --keep-succeeded 1 --retain-after-last-use-seconds 0 \
  --gc-interval-seconds 5 >>"$STATE_DIR/logs/bench-rollouts-operator.log" 2>&1 &
op_pid=$!

# Revision R's flake: the fixture with salt R, archived into the host's store (which the nodes'
# Nix daemons share).
flake_of() {
  local dir="$work/flake-$1"
  mkdir -p "$dir/bin"
  cp tests/fixtures/images/{flake.nix,parts.sh} "$dir/"
  cp /bin/busybox "$dir/bin/busybox"
  printf "rollouts-%s-%s" "$1" "$$" > "$dir/salt"
  echo "path:$(NIX_REMOTE=daemon NIX_CONFIG='experimental-features = nix-command flakes' \
    nix flake archive --json "path:$dir" | sed 's/.*"path":"\([^"]*\)".*/\1/')"
}

deploy() { # FLAKE TAG
  k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: 2
  strategy: {type: Recreate}
  selector: {matchLabels: {app: app}}
  template:
    metadata:
      labels: {app: app}
      annotations:
        enbi.hrzn.ee/nixbuild-flakeUrl: "$1"
        enbi.hrzn.ee/nixbuild-imageTag: "$2"
        enbi.hrzn.ee/nixbuild-packageName: stream-50
        enbi.hrzn.ee/nixbuild-system: $system
    spec:
      nodeSelector: {type: real}
      tolerations: [{key: enbi.test/real-node, operator: Exists}]
      terminationGracePeriodSeconds: 1
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - {labelSelector: {matchLabels: {app: app}}, topologyKey: kubernetes.io/hostname}
      containers:
      - {name: app, image: "$2", command: [/bin/busybox, sleep, "3600"]}
YAML
}

# Bytes in a node's containerd content store, and this bench's image names there.
content_bytes() { tests/cluster/real-node exec "$1" du -sb /var/lib/containerd/io.containerd.content.v1.content | cut -f1; }
our_images() { ctr_on "$1" images ls -q | grep -c "^$REPO:" || true; }

declare -A base
for node in "${nodes[@]}"; do base[$node]=$(content_bytes "$node"); done
printf '%-8s %s\n' rollout "$(for n in "${nodes[@]::2}"; do printf "%-40s" "$n (MiB over start, images)"; done)"
for ((r = 1; r <= rollouts; r++)); do
  tag="$REPO:r$r-$$"
  deploy "$(flake_of "$r")" "$tag"
  k -n "$NS" rollout status deploy/app --timeout=600s >/dev/null
  # The previous revision's Pods are gone: its NixBuild is collected within a GC period and its
  # image released (at most --release-timeout-seconds); wait until only this revision's is left.
  deadline=$((SECONDS + 180))
  until [[ "$(k -n "$NS" get nixbuilds -o name | wc -l)" -le 1 ]]; do
    ((SECONDS < deadline)) || { echo "old NixBuilds stay: $(k -n "$NS" get nixbuilds -o name | paste -sd' ')" >&2; exit 1; }
    sleep 1
  done
  sleep 2 # containerd's GC runs right after a removal
  row=""
  for node in "${nodes[@]::2}"; do
    mib=$(( ($(content_bytes "$node") - base[$node]) / 1048576 ))
    row+=$(printf "%-40s" "$mib MiB, $(our_images "$node")")
  done
  printf '%-8s %s\n' "$r" "$row"
done
# Every build attempt has its Event `Scheduled` (kept an hour): one per revision means no
# rebuild, whatever history limits collected.
attempts=$(k -n "$NS" get events --field-selector reason=Scheduled,involvedObject.kind=NixBuild -o name | wc -l)
echo "build attempts: $attempts for $rollouts revisions (rebuilds: $((attempts - rollouts)))"
