#!/usr/bin/env bash
# How fast a built image reaches a second node: through Spegel, and through enbi's own load.
#
# Usage: bench/spread.sh [RUNS] [PACKAGE]     (defaults 3, stream-big: a 200 MiB image)
#
# Needs root and the local cluster with its real nodes and Spegel (tests/cluster/up --real-node).
# Each run, for each way, with a fresh tag:
#   - a NixBuild of the fixture flake (tests/fixtures/images, in the host's Nix store, which the
#     nodes' builders share) builds on one real node (A); the clock starts when it is Succeeded;
#   - then a Pod that needs the image is created on the other real node (B), and the clock
#     stops when B's containerd holds the tag (polled every 0.1 s).
# "spegel": the operator runs with --image-mirror, so the kubelet's first pull on B goes
#   through Spegel, which fetches the image from A.
# "enbi": Spegel is taken off the nodes (the mirror port is then closed, pulls fail at once)
#   and the operator, without --image-mirror, runs a load Job on B: the locked flake built
#   again there (here a store hit, since the nodes share a Nix store) and streamed in.
# "enbi-rebuild": as "enbi", but the nodes' store first loses the image's closure (as a new node's
#   store has none of it), so the load builds it again.
# "enbi-cache": as "enbi-rebuild", with a binary cache (tests/cluster/nix-cache, nginx over HTTP,
#   uncompressed): the build pushes its closure there, the load substitutes it.
# Prints each time and the medians. Set ENBI_BIN to use a prebuilt operator binary.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
package=${2:-stream-big}
# shellcheck source=../tests/cluster/lib.sh
source tests/cluster/lib.sh
export KUBECONFIG="$KUBECONFIG_OUT"
KUBECTL="$K8S_BIN/kubectl"
k() { "$KUBECTL" "$@"; }
[[ $EUID -eq 0 ]] || { echo "bench/spread.sh needs root (the real nodes)" >&2; exit 1; }
mapfile -t nodes < <(tests/cluster/real-node nodes)
((${#nodes[@]} >= 2)) || { echo "needs two real nodes: tests/cluster/up --real-node" >&2; exit 1; }

if [[ -z "${ENBI_BIN:-}" ]]; then
  cargo build -q --release -p enbi-operator
  ENBI_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/enbi-operator"
fi
BUILDER=localhost/enbi:bench-spread
tests/cluster/real-node builder-image "$ENBI_BIN" "$BUILDER" 2>/dev/null
"$ENBI_BIN" crd | k apply --server-side --force-conflicts --field-manager=enbi-bench -f - >/dev/null
k wait --for=condition=Established crd/nixbuilds.enbi.hrzn.ee >/dev/null

flake_dir="$(mktemp -d)"
mkdir -p "$flake_dir/bin"
cp tests/fixtures/images/{flake.nix,parts.sh} "$flake_dir/"
cp /bin/busybox "$flake_dir/bin/busybox"
flake="path:$(NIX_REMOTE=daemon NIX_CONFIG='experimental-features = nix-command flakes' \
  nix flake archive --json "path:$flake_dir" | sed 's/.*"path":"\([^"]*\)".*/\1/')"
system=$( [[ $(uname -m) == aarch64 ]] && echo aarch64-linux || echo x86_64-linux )
repel="$(k get nodes -l type=kwok -o name | sed 's|node/||' | paste -sd,)"

NS=enbi-bench-spread BNS=enbi-bench-spread-builds
op_pid=
stop_operator() {
  [[ -z "$op_pid" ]] && return
  kill "$op_pid" 2>/dev/null || true
  wait "$op_pid" 2>/dev/null || true
  op_pid=
}
spegel_on() { tests/cluster/real-node spegel on 2>/dev/null; }
spegel_off() { tests/cluster/real-node spegel off 2>/dev/null; }
cleanup() {
  stop_operator
  spegel_on
  for nb in $(k -n "$NS" get nixbuilds -o name 2>/dev/null); do
    k -n "$NS" patch "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null
  done
  k delete ns "$NS" "$BNS" --ignore-not-found --wait=false >/dev/null
  rm -rf "$flake_dir"
}
trap cleanup EXIT

start_operator() { # extra args...
  stop_operator
  RUST_LOG=warn "$ENBI_BIN" run --build-namespace "$BNS" --builder-image "$BUILDER" \
    --store-mode node-daemon --builder-tolerations enbi.test/real-node --node-repel "$repel" \
    --listen-address 127.0.0.1:18091 --reload-after-seconds 600 "$@" \
    >>"$STATE_DIR/logs/bench-spread-operator.log" 2>&1 &
  op_pid=$!
}

nixd() { NIX_REMOTE=daemon NIX_CONFIG='experimental-features = nix-command flakes' "$@"; }
# forget STORE_PATH: the nodes' store loses it and all of its closure that nothing else holds.
forget() {
  local p
  for p in $(nixd nix-store -qR "$1" | tac); do
    nixd nix store delete "$p" >/dev/null 2>&1 || true
  done
  if nixd nix path-info "$1" >/dev/null 2>&1; then echo "$1 is still in the store" >&2; exit 1; fi
}
cache_has() { # STORE_PATH
  local hash="${1#/nix/store/}"
  curl -fsS -o /dev/null "$cache_url/${hash%%-*}.narinfo" 2>/dev/null
}

now_ms() { date +%s%3N; }
has_image() { # NODE TAG
  local images
  images="$("$(containerd_dir)/ctr" --address "$(tests/cluster/real-node socket "$1")" -n k8s.io images ls -q 2>/dev/null)"
  [[ $'\n'"$images"$'\n' == *$'\n'"$2"$'\n'* ]]
}

# one WAY RUN: prints the milliseconds from Succeeded to the image on the second node.
one() {
  local way="$1" run="$2" tag name a b t0 deadline
  tag="enbi.test/spread-$way:$run-$(now_ms)"
  name="spread-$way-$run"
  k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: enbi.hrzn.ee/v1alpha1
kind: NixBuild
metadata: {name: $name}
spec: {flakeUrl: "$flake", packageName: $package, imageTag: "$tag", system: $system}
YAML
  deadline=$((SECONDS + 300))
  until [[ "$(k -n "$NS" get nixbuild "$name" -o jsonpath='{.status.phase}')" == Succeeded ]]; do
    ((SECONDS < deadline)) || { echo "$name not Succeeded" >&2; exit 1; }
    sleep 0.1
  done
  if [[ $way == enbi-rebuild || $way == enbi-cache ]]; then
    local out
    out="$(k -n "$NS" get nixbuild "$name" -o jsonpath='{.status.provenance.storePath}')"
    # The build pushes after it handed the image over: wait for it.
    until [[ $way == enbi-rebuild ]] || cache_has "$out"; do
      ((SECONDS < deadline)) || { echo "$out never reached the cache" >&2; exit 1; }
      sleep 0.1
    done
    forget "$out"
  fi
  t0=$(now_ms)
  a="$(k -n "$NS" get nixbuild "$name" -o jsonpath='{.status.buildNode}')"
  b="$(printf '%s\n' "${nodes[@]}" | grep -vxF "$a" | head -1)"
  k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $name
  annotations:
    enbi.hrzn.ee/nixbuild-flakeUrl: "$flake"
    enbi.hrzn.ee/nixbuild-imageTag: "$tag"
    enbi.hrzn.ee/nixbuild-packageName: $package
spec:
  nodeName: $b
  tolerations: [{key: enbi.test/real-node, operator: Exists}]
  containers: [{name: app, image: "$tag", imagePullPolicy: IfNotPresent}]
YAML
  until has_image "$b" "$tag"; do
    ((SECONDS < deadline)) || { echo "$tag never reached $b" >&2; exit 1; }
    sleep 0.1
  done
  echo $(($(now_ms) - t0))
}

median() { sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : int((v[NR/2]+v[NR/2+1])/2)}'; }

k delete ns "$NS" "$BNS" --ignore-not-found --wait >/dev/null
k create ns "$NS" >/dev/null
# Its Pods may ask for builds (and loads): namespaces opt in.
k label ns "$NS" enbi.hrzn.ee/pod-builds=enabled >/dev/null
k create ns "$BNS" >/dev/null
k -n "$BNS" create serviceaccount enbi-builder >/dev/null
k -n "$NS" wait --for=jsonpath='{.metadata.name}'=default serviceaccount/default --timeout=30s >/dev/null

eval "$(tests/cluster/nix-cache up | sed 's/^/cache_/')"
cache_url="$cache_URL"
k -n "$BNS" create secret generic cache-key --from-file=secret-key="$cache_SECRET_KEY_FILE" >/dev/null

ways=(spegel enbi enbi-rebuild enbi-cache)
declare -A times
for way in "${ways[@]}"; do
  case $way in
    spegel) spegel_on; start_operator --image-mirror ;;
    enbi | enbi-rebuild) spegel_off; start_operator ;;
    enbi-cache)
      spegel_off
      tests/cluster/nix-cache clear
      start_operator --cache-substituters "$cache_url" --cache-trusted-public-keys "$cache_PUBLIC_KEY" \
        --cache-push-to "$cache_url?compression=none" --cache-signing-secret cache-key
      ;;
  esac
  for ((r = 1; r <= runs; r++)); do
    t=$(one "$way" "$r")
    echo "$way run $r: $t ms" >&2
    times[$way]+="$t "
  done
done
for way in "${ways[@]}"; do
  printf '%-12s median %s ms (runs: %s)\n' "$way" "$(tr ' ' '\n' <<<"${times[$way]}" | grep . | median)" "${times[$way]% }"
done
