#!/usr/bin/env bash
# The operator's memory at cluster scale, on the local cluster:
#   1. RSS idle (no bench Pods), steady and peak with PODS Pods that never run (scheduling-gated:
#      no node, so kwok does no work), ANNOTATED of them with enbi annotations over 50 images;
#   2. the same operator restarted with the Pods present: peak and steady RSS;
#   3. the time from one more annotated Pod, created last and really failing its pull on a kwok
#      node, to its NixBuild;
#   4. the operator's API requests at rest (enbi_api_requests_total and enbi_api_writes_total over
#      BENCH_REST seconds, default 60).
# Usage: bench/pods-memory.sh PODS ANNOTATED [OPERATOR_BINARY]
#   (default binary: this checkout's release build; give another, e.g. an older build, to compare)
#   ENBI_APISERVER_FEATURE_GATES=WatchList=false: against an apiserver without streaming lists
#   (`up` restarts it so), where the operator's watches list in pages.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/cluster/lib.sh
PODS=${1:?usage: bench/pods-memory.sh PODS ANNOTATED [OPERATOR_BINARY]}
ANNOTATED=${2:?usage: bench/pods-memory.sh PODS ANNOTATED [OPERATOR_BINARY]}
BIN=${3:-}
REST=${BENCH_REST:-60}
PORT=${BENCH_PORT:-18090}
IMAGES=50
KUBECTL="$K8S_BIN/kubectl"
export KUBECONFIG="$(tests/cluster/up)"
if [[ -z "$BIN" ]]; then
  cargo build -q --release -p enbi-operator
  BIN=target/release/enbi-operator
fi
NS=bench-memory BNS=bench-memory-builds
LOG="$STATE_DIR/logs/bench-memory-operator.log"
"$BIN" crd | "$KUBECTL" apply --server-side --force-conflicts --field-manager=enbi-bench -f - >/dev/null
"$KUBECTL" wait --for=condition=Established crd/nixbuilds.enbi.hrzn.ee >/dev/null
for nb in $("$KUBECTL" -n "$NS" get nixbuilds -o name 2>/dev/null); do
  "$KUBECTL" -n "$NS" patch "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null
done
"$KUBECTL" delete ns "$NS" "$BNS" --ignore-not-found --wait --timeout=600s >/dev/null
"$KUBECTL" create ns "$NS" >/dev/null
# Opted in to builds from Pod annotations (without it the probe Pod gets no NixBuild).
"$KUBECTL" label ns "$NS" enbi.hrzn.ee/pod-builds=enabled >/dev/null
"$KUBECTL" create ns "$BNS" >/dev/null
"$KUBECTL" -n "$BNS" create serviceaccount enbi-builder >/dev/null
nodes=$("$KUBECTL" get nodes -l type=kwok -o name)
# Only the builder image is on the nodes: the probe Pod's pull fails.
for n in $nodes; do "$KUBECTL" annotate --overwrite "$n" kwok.enbi.test/images=localhost/enbi:bench >/dev/null; done
work=$(mktemp -d)
cleanup() {
  kill "${OP:-}" "${SAMPLER:-}" 2>/dev/null || true
  for n in $nodes; do "$KUBECTL" annotate "$n" kwok.enbi.test/images- >/dev/null 2>&1 || true; done
  for nb in $("$KUBECTL" -n "$NS" get nixbuilds -o name 2>/dev/null); do
    "$KUBECTL" -n "$NS" patch "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
  done
  [[ -n "${BENCH_KEEP:-}" ]] || "$KUBECTL" delete ns "$NS" "$BNS" --wait=false >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start_operator() {
  RUST_LOG="${BENCH_LOG:-warn}" "$BIN" run --build-namespace "$BNS" --builder-image localhost/enbi:bench \
    --listen-address "127.0.0.1:$PORT" --gc-interval-seconds 3600 >>"$LOG" 2>&1 &
  OP=$!
  until curl -sf "127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.2; done
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$OP/status"; }
peak() { awk '/VmHWM/ {print $2}' "/proc/$OP/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k/1024}'; }
# RSS settles once the watch is quiet: wait until it moved by less than 1 % in 5 s.
settle() {
  local a b
  b=$(rss)
  while :; do
    sleep 5
    a=$b b=$(rss)
    awk -v a="$a" -v b="$b" 'BEGIN {exit !(b - a < a / 100 && a - b < a / 100)}' && break
  done
  echo "$b"
}

: >"$LOG"
start_operator
sleep 2
RSS_IDLE=$(settle)

# PODS Pods in chunks of 500, four kubectl processes at a time.
awk -v n="$PODS" -v a="$ANNOTATED" -v images="$IMAGES" -v ns="$NS" -v dir="$work" 'BEGIN {
  for (i = 0; i < n; i++) {
    f = sprintf("%s/pods-%05d.yaml", dir, int(i / 500))
    printf "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p-%d\n  namespace: %s\n", i, ns > f
    printf "  labels: {app: filler-%d, tier: backend, team: bench}\n", i % 100 > f
    printf "  annotations:\n    example.com/owner: team-bench\n    example.com/revision: \"%d\"\n", i > f
    image = sprintf("registry.example/filler-%d:v1", i % 100)
    if (i < a) {
      image = sprintf("bench.example/app-%d:v1", i % images)
      printf "    enbi.hrzn.ee/nixbuild-flakeUrl: github:example/app\n" > f
      printf "    enbi.hrzn.ee/nixbuild-packageName: app-%d\n", i % images > f
      printf "    enbi.hrzn.ee/nixbuild-imageTag: %s\n", image > f
    }
    printf "spec:\n  schedulingGates: [{name: enbi.test/hold}]\n  containers:\n  - name: app\n    image: %s\n", image > f
    printf "    imagePullPolicy: IfNotPresent\n    env: [{name: MODE, value: production}, {name: LOG_LEVEL, value: info}]\n" > f
    printf "    ports: [{containerPort: 8080, name: http}]\n    resources: {requests: {cpu: 10m, memory: 16Mi}}\n" > f
  }
}'
created_at=$(date +%s)
(
  while kill -0 "$OP" 2>/dev/null; do rss >>"$work/rss"; sleep 0.5; done
) &
SAMPLER=$!
ls "$work"/pods-*.yaml | xargs -P 4 -n 1 "$KUBECTL" create -o name -f >/dev/null
created=$("$KUBECTL" -n "$NS" get pods --no-headers 2>/dev/null | wc -l)
echo "created $created Pods in $(( $(date +%s) - created_at )) s"
RSS_STEADY=$(settle)
RSS_PEAK=$(peak)

# The operator restarted with the Pods present.
kill "$OP"
wait "$OP" 2>/dev/null || true
start_operator
RSS_RESTART_STEADY=$(settle)
RSS_RESTART_PEAK=$(peak)

# One more annotated Pod, not gated, on a kwok node without its image: ErrImagePull, NixBuild.
probe_start=$(date +%s.%N)
"$KUBECTL" -n "$NS" create -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: probe
  annotations:
    enbi.hrzn.ee/nixbuild-flakeUrl: github:example/app
    enbi.hrzn.ee/nixbuild-packageName: probe
    enbi.hrzn.ee/nixbuild-imageTag: bench.example/probe:v1
spec:
  nodeSelector: {kubernetes.io/arch: amd64, type: kwok}
  tolerations: [{key: kwok.x-k8s.io/node, operator: Exists}]
  containers: [{name: app, image: bench.example/probe:v1, imagePullPolicy: IfNotPresent}]
YAML
deadline=$((SECONDS + 120))
until "$KUBECTL" -n "$NS" get nixbuilds -o name 2>/dev/null | grep -q .; do
  ((SECONDS < deadline)) || { echo "no NixBuild for the probe Pod after 120 s" >&2; exit 1; }
  sleep 0.1
done
probe_done=$(date +%s.%N)
pulled=$("$KUBECTL" -n "$NS" get events --field-selector involvedObject.name=probe,reason=Failed \
  -o jsonpath='{.items[0].firstTimestamp}')

# At rest: what the operator asks of the API in REST seconds.
sleep 10
metric() { curl -s "127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 ~ "^" m {s += $2} END {print s + 0}'; }
have_requests=$(curl -s "127.0.0.1:$PORT/metrics" | grep -c '^enbi_api_requests_total' || true)
r0=$(metric enbi_api_requests_total) l0=$(metric 'enbi_api_requests_total\\{verb="list"') w0=$(metric enbi_api_writes_total)
sleep "$REST"
r1=$(metric enbi_api_requests_total) l1=$(metric 'enbi_api_requests_total\\{verb="list"') w1=$(metric enbi_api_writes_total)

# How the operator's watches list (enbi_watch_list_mode; nothing from a binary without it).
modes=$(curl -s "127.0.0.1:$PORT/metrics" | awk -F'mode="' '/^enbi_watch_list_mode/ {
  split($2, a, "\"} "); n[a[1]] += a[2]
} END {for (m in n) if (n[m]) {printf "%s%d %s", s, n[m], m; s = ", "}}')

echo "pods=$PODS annotated=$ANNOTATED images=$IMAGES binary=$BIN apiserver feature gates: ${ENBI_APISERVER_FEATURE_GATES:-none}"
[[ -z "$modes" ]] || echo "watches: $modes"
echo "operator RSS: idle $(mib "$RSS_IDLE"), steady $(mib "$RSS_STEADY") (+$(mib $((RSS_STEADY - RSS_IDLE))) over idle), peak $(mib "$RSS_PEAK")"
echo "operator restarted with the Pods: steady $(mib "$RSS_RESTART_STEADY"), peak $(mib "$RSS_RESTART_PEAK") ($(awk -v p="$RSS_RESTART_PEAK" -v s="$RSS_STEADY" 'BEGIN {printf "%.2f", p/s}')x the steady RSS before the restart)"
awk -v a="$probe_start" -v b="$probe_done" 'BEGIN {printf "last annotated Pod to its NixBuild: %.1f s", b - a}'
echo " (the Pod's first pull failure at $pulled)"
if [[ "$have_requests" -gt 0 ]]; then
  awk -v r=$((r1 - r0)) -v l=$((l1 - l0)) -v w=$((w1 - w0)) -v t="$REST" \
    'BEGIN {printf "at rest over %d s: %.1f API requests/min, %d lists, %d writes\n", t, r * 60 / t, l, w}'
else
  echo "at rest over $REST s: $((w1 - w0)) writes (this binary does not count other requests)"
fi
