#!/usr/bin/env bash
# Pod watcher and controller at scale, on the local cluster (kwok nodes):
#   1. PODS annotated Pods over IMAGES missing images -> exactly IMAGES NixBuilds and Jobs, and
#      the time from the moment every Pod waits on its image to the last NixBuild created;
#   2. operator RSS with 0 Pods and with the Pods watched (scale with PODS);
#   3. apiserver write requests per successful build (from the apiserver's own metrics).
# Usage: bench/podwatch.sh [PODS] [IMAGES]     (defaults 1000 50)
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/cluster/lib.sh
PODS=${1:-1000}
IMAGES=${2:-50}
REPLICAS=$((PODS / IMAGES))
KUBECTL="$K8S_BIN/kubectl"
export KUBECONFIG="$(tests/cluster/up)"
cargo build -q --release -p enbi-operator
BIN=target/release/enbi-operator
NS=bench-pods BNS=bench-builds
"$BIN" crd | "$KUBECTL" apply --server-side --force-conflicts --field-manager=enbi-bench -f - >/dev/null
"$KUBECTL" wait --for=condition=Established crd/nixbuilds.enbi.hrzn.ee >/dev/null
# Leftovers of an interrupted run: without an operator, NixBuild finalizers would hold them.
for nb in $("$KUBECTL" -n "$NS" get nixbuilds -o name 2>/dev/null); do
  "$KUBECTL" -n "$NS" patch "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null
done
"$KUBECTL" delete ns "$NS" "$BNS" --ignore-not-found --wait >/dev/null
"$KUBECTL" create ns "$NS" >/dev/null
"$KUBECTL" label ns "$NS" enbi.hrzn.ee/pod-builds=enabled >/dev/null
"$KUBECTL" create ns "$BNS" >/dev/null
"$KUBECTL" -n "$BNS" create serviceaccount enbi-builder >/dev/null
nodes=$("$KUBECTL" get nodes -l type=kwok -o name)
# kwok nodes hold 110 Pods each; the amd64 pair must hold all of them (one system per image).
for n in $("$KUBECTL" get nodes -l type=kwok,kubernetes.io/arch=amd64 -o name); do
  "$KUBECTL" patch "$n" --subresource=status --type=merge \
    -p "{\"status\":{\"capacity\":{\"pods\":\"$PODS\"},\"allocatable\":{\"pods\":\"$PODS\"}}}" >/dev/null
done
for n in $nodes; do "$KUBECTL" annotate --overwrite "$n" kwok.enbi.test/images=localhost/enbi:bench >/dev/null; done
cleanup() { # the operator still runs while the namespaces go, to release its finalizers
  for n in $nodes; do "$KUBECTL" annotate "$n" kwok.enbi.test/images- >/dev/null 2>&1 || true; done
  [[ -n "${BENCH_KEEP:-}" ]] || "$KUBECTL" delete ns "$NS" "$BNS" --timeout=120s >/dev/null 2>&1 || true
  kill "${OP:-}" 2>/dev/null || true
}
trap cleanup EXIT

# --image-mirror: every node "has" each built image at once (the kwok nodes' image list), as a
# mirror would spread it; the bench measures the Pod watcher, not loads on other nodes.
RUST_LOG="${BENCH_LOG:-warn}" "$BIN" run --build-namespace "$BNS" --builder-image localhost/enbi:bench --image-mirror \
  --listen-address 127.0.0.1:18090 --max-concurrent-builds 0 --max-builds-per-node 0 \
  --gc-interval-seconds 3600 >"$STATE_DIR/logs/bench-operator.log" 2>&1 &
OP=$!
until curl -sf 127.0.0.1:18090/readyz >/dev/null; do sleep 0.2; done
sleep 1
rss() { awk '/VmRSS/ {print $2}' "/proc/$OP/status"; }
RSS_IDLE=$(rss)

manifests=$(mktemp)
for i in $(seq 1 "$IMAGES"); do
  cat <<YAML
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app-$i, namespace: $NS}
spec:
  replicas: $REPLICAS
  selector: {matchLabels: {app: app-$i}}
  template:
    metadata:
      labels: {app: app-$i}
      annotations:
        enbi.hrzn.ee/nixbuild-flakeUrl: github:example/app
        enbi.hrzn.ee/nixbuild-packageName: app-$i
        enbi.hrzn.ee/nixbuild-imageTag: bench.example/app-$i:v1
    spec:
      nodeSelector: {kubernetes.io/arch: amd64, type: kwok}
      tolerations: [{key: kwok.x-k8s.io/node, operator: Exists}]
      containers: [{name: app, image: bench.example/app-$i:v1, imagePullPolicy: IfNotPresent}]
YAML
done >"$manifests"
# The operator's own count of its write requests, by resource.
writes() { curl -s 127.0.0.1:18090/metrics | awk -v r="$1" '$1 ~ "^enbi_api_writes_total\\{resource=\"" r "\"\\}" {print $2; f=1} END {if (!f) print 0}'; }
start=$(date +%s.%N)
"$KUBECTL" apply -f "$manifests" >/dev/null
all_waiting="" last_build=""
while :; do
  now=$(date +%s.%N)
  waiting=$("$KUBECTL" -n "$NS" get pods --no-headers 2>/dev/null | grep -cE 'ErrImagePull|ImagePullBackOff' || true)
  built=$("$KUBECTL" -n "$NS" get nixbuilds --no-headers 2>/dev/null | wc -l)
  [[ -z "$all_waiting" && "$waiting" -ge "$PODS" ]] && all_waiting=$now
  [[ -z "$last_build" && "$built" -ge "$IMAGES" ]] && last_build=$now
  [[ -n "$all_waiting" && -n "$last_build" ]] && break
  if (( $(echo "$now - $start > 600" | bc) )); then echo "timed out: $waiting waiting, $built NixBuilds" >&2; exit 1; fi
  sleep 0.5
done
sleep 5
BUILDS=$("$KUBECTL" -n "$NS" get nixbuilds --no-headers | wc -l)
JOBS=$("$KUBECTL" -n "$BNS" get jobs --no-headers | wc -l)
RSS_PODS=$(rss)

# Finish every builder with a success report.
for p in $("$KUBECTL" -n "$BNS" get pods -o name); do
  "$KUBECTL" -n "$BNS" annotate "$p" kwok.enbi.test/exit-code=0 \
    "kwok.enbi.test/termination-message=$(printf '{"result":"Succeeded","imageTag":"%s","digest":"sha256:%064d","size":1,"storePath":"/nix/store/x","bytesStreamed":1,"imported":true,"timings":{"buildMs":0,"importMs":0,"totalMs":0}}' \
      "$("$KUBECTL" -n "$BNS" get "$p" -o jsonpath='{.spec.containers[0].args[8]}')" 0)" >/dev/null
done
until [[ $("$KUBECTL" -n "$NS" get nixbuilds -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c Succeeded) -ge "$IMAGES" ]]; do sleep 1; done
sleep 3
echo "pods=$PODS images=$IMAGES nixbuilds=$BUILDS jobs=$JOBS"
awk -v a="$all_waiting" -v b="$last_build" 'BEGIN {d=b-a; printf "last NixBuild after all Pods waiting: %.1f s%s\n", (d>0?d:0), (d<=0?" (every NixBuild existed before the last Pod failed)":"")}'
echo "operator RSS: idle ${RSS_IDLE} KiB, with $PODS Pods ${RSS_PODS} KiB"
nb=$(writes nixbuilds) st=$(writes nixbuilds/status) jb=$(writes jobs) ev=$(writes events)
echo "operator writes: nixbuilds=$nb nixbuilds/status=$st jobs=$jb events=$ev (of which $PODS are one WaitingForBuild per Pod)"
awk -v n="$nb" -v s="$st" -v j="$jb" -v e="$ev" -v p="$PODS" -v i="$IMAGES" 'BEGIN {printf "writes per successful build: %.1f objects + %.1f Events\n", (n+s+j)/i, (e-p)/i}'

