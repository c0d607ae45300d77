#!/usr/bin/env bash
# Scheduling gates on the local cluster's real node (enbi-real-0), TRIALS trials each:
#   1. a gated Pod: from its NixBuild turning Succeeded (the image is loaded) to the Pod Ready;
#   2. a Deployment's Pod in pull back-off (no webhook at its creation): the same;
#   3. Pod creation (kubectl create returned) to its NixBuild existing (gated Pods).
# Times are this host's clock when `kubectl get -w` printed the change (ms resolution).
# The webhook's added latency to Pod creation: bench/webhook-latency.sh.
# Usage: bench/gates.sh [TRIALS]     (default 10); needs root (tests/cluster/up --real-node)
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/cluster/lib.sh
# shellcheck source=webhook.sh
source bench/webhook.sh
TRIALS=${1:-10}
KUBECTL="$K8S_BIN/kubectl"
export KUBECONFIG="$(tests/cluster/up --real-node)"
cargo build -q --workspace
BIN=target/debug/enbi-operator
PORT=19480
NS=bench-gates BNS=bench-gates-b
"$BIN" crd | "$KUBECTL" apply --server-side --force-conflicts --field-manager=enbi-bench -f - >/dev/null
"$KUBECTL" wait --for=condition=Established crd/nixbuilds.enbi.hrzn.ee >/dev/null
tests/cluster/real-node builder-image "$BIN" localhost/enbi:bench >/dev/null 2>&1
SOCKET=$(tests/cluster/real-node socket)
# The offline fixture flake next to a static busybox (as the tests' Fixture), in the host's store.
fixture=$(mktemp -d)
cp tests/fixtures/images/flake.nix tests/fixtures/images/parts.sh "$fixture/"
mkdir "$fixture/bin" && cp /bin/busybox "$fixture/bin/busybox"
FLAKE="path:$(NIX_CONFIG='experimental-features = nix-command flakes' NIX_REMOTE=daemon \
  nix flake archive --json "path:$fixture" | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')"
REPEL=$("$KUBECTL" get nodes -o name | sed 's|node/||' | grep -vx enbi-real-0 | paste -sd,)

clean_ns() {
  for nb in $("$KUBECTL" -n "$NS" get nixbuilds -o name 2>/dev/null); do
    "$KUBECTL" -n "$NS" patch "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
  done
  "$KUBECTL" delete ns "$NS" --ignore-not-found --wait --timeout=120s >/dev/null
}
cleanup() {
  kill "${OP:-}" 2>/dev/null || true
  "$KUBECTL" delete mutatingwebhookconfiguration bench-gates --ignore-not-found >/dev/null 2>&1 || true
  clean_ns || true
  "$KUBECTL" delete ns "$BNS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  "$KUBECTL" annotate nodes -l type=kwok kwok.enbi.test/images- >/dev/null 2>&1 || true
  ctr --address "$SOCKET" -n k8s.io images ls -q | grep '^enbi.bench/' | xargs -r ctr --address "$SOCKET" -n k8s.io images rm >/dev/null 2>&1 || true
}
trap cleanup EXIT
clean_ns
"$KUBECTL" delete ns "$BNS" --ignore-not-found --wait >/dev/null
"$KUBECTL" create ns "$BNS" >/dev/null
"$KUBECTL" -n "$BNS" create serviceaccount enbi-builder >/dev/null

POD_NAMESPACE="$BNS" RUST_LOG=warn "$BIN" run --build-namespace "$BNS" --builder-image localhost/enbi:bench \
  --listen-address 127.0.0.1:18095 --store-mode node-daemon --containerd-socket "$SOCKET" \
  --builder-tolerations enbi.test/real-node --node-repel "$REPEL" --max-concurrent-builds 0 \
  --max-builds-per-node 0 --webhook-configuration bench-gates --webhook-address "127.0.0.1:$PORT" \
  --webhook-hosts 127.0.0.1 >"$STATE_DIR/logs/bench-gates-operator.log" 2>&1 &
OP=$!
until curl -sf 127.0.0.1:18095/readyz >/dev/null; do sleep 0.2; done

webhook() { # $1: on|off
  "$KUBECTL" delete mutatingwebhookconfiguration bench-gates --ignore-not-found >/dev/null
  [[ $1 == on ]] || return 0
  apply_webhook bench-gates "$NS" "$PORT"
}

watch_stamped() { # FILE ARGS...: background watch, lines stamped on arrival
  local file=$1; shift
  ("$KUBECTL" "$@" -w 2>/dev/null | while IFS= read -r line; do echo "$(date +%s.%N) $line"; done >"$file") \
    >/dev/null 2>&1 &
  echo $!
}
first_at() { # FILE PATTERN: the stamp of the first line matching PATTERN
  local f=$1 p=$2
  for _ in $(seq 600); do
    t=$(awk -v p="$p" '$0 ~ p {print $1; exit}' "$f" 2>/dev/null)
    [[ -n "$t" ]] && { echo "$t"; return; }
    sleep 0.1
  done
  echo "timed out waiting for $p in $f" >&2; return 1
}
pod_yaml() { # NAME TAG KIND
  local meta="annotations: {enbi.hrzn.ee/nixbuild-flakeUrl: \"$FLAKE\", enbi.hrzn.ee/nixbuild-imageTag: \"$2\", enbi.hrzn.ee/nixbuild-packageName: stream}"
  local spec="nodeSelector: {kubernetes.io/hostname: enbi-real-0}
    tolerations: [{key: enbi.test/real-node, operator: Exists}]
    terminationGracePeriodSeconds: 1
    containers: [{name: app, image: \"$2\", imagePullPolicy: IfNotPresent, command: [/bin/busybox, sleep, \"600\"]}]"
  if [[ $3 == pod ]]; then
    printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: %s, labels: {app: %s}, %s}\nspec:\n    %s\n' "$1" "$NS" "$1" "$meta" "$spec"
  else
    printf 'apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: %s, namespace: %s}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: %s}}\n  template:\n    metadata: {labels: {app: %s}, %s}\n    spec:\n      %s\n' \
      "$1" "$NS" "$1" "$1" "$meta" "$(echo "$spec" | sed 's/^    /      /')"
  fi
}

trial() { # KIND(pod|deployment) N: prints "<ready after loaded> <nixbuild after create>"
  local kind=$1 n=$2 tag="enbi.bench/app:$1-$2-$RANDOM" dir
  dir=$(mktemp -d)
  local w1 w2
  w1=$(watch_stamped "$dir/nb" -n "$NS" get nixbuilds --no-headers -o custom-columns=N:.metadata.name,P:.status.phase)
  w2=$(watch_stamped "$dir/pod" -n "$NS" get pods -l "app=t$n$kind" --no-headers \
    -o 'custom-columns=N:.metadata.name,R:.status.conditions[?(@.type=="Ready")].status')
  sleep 0.5
  pod_yaml "t$n$kind" "$tag" "$kind" | "$KUBECTL" create -f - >/dev/null
  local created; created=$(date +%s.%N)
  local nb_at loaded ready
  nb_at=$(first_at "$dir/nb" ".")
  loaded=$(first_at "$dir/nb" "Succeeded")
  ready=$(first_at "$dir/pod" " True")
  pkill -P "$w1" 2>/dev/null || true; pkill -P "$w2" 2>/dev/null || true # their kubectl and reader
  kill "$w1" "$w2" 2>/dev/null || true
  "$KUBECTL" -n "$NS" delete "$kind" "t$n$kind" --wait=false >/dev/null
  "$KUBECTL" -n "$NS" delete nixbuilds --all --wait=false >/dev/null
  echo "$(echo "$ready - $loaded" | bc -l) $(echo "$nb_at - $created" | bc -l)"
  rm -rf "$dir"
}

"$KUBECTL" create ns "$NS" >/dev/null
"$KUBECTL" label ns "$NS" enbi.hrzn.ee/pod-builds=enabled >/dev/null
webhook on
echo "== gated Pods: NixBuild Succeeded -> Pod Ready; Pod created -> NixBuild"
for i in $(seq "$TRIALS"); do trial pod "$i"; done | tee /tmp/bench-gates-gated
webhook off
echo "== Deployment Pods in pull back-off (no webhook): NixBuild Succeeded -> new Pod Ready"
for i in $(seq "$TRIALS"); do trial deployment "$i"; done | tee /tmp/bench-gates-backoff
summary() { sort -n | awk '{a[NR]=$1} END {printf "min %.2f s, median %.2f s, max %.2f s (n=%d)\n", a[1], a[int((NR+1)/2)], a[NR], NR}'; }
echo "gated Pod Ready after the image landed: $(awk '{print $1}' /tmp/bench-gates-gated | summary)"
echo "Pod creation to NixBuild:               $(awk '{print $2}' /tmp/bench-gates-gated | summary)"
echo "back-off Pod Ready after the image landed: $(awk '{print $1}' /tmp/bench-gates-backoff | summary)"
