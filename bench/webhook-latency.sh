#!/usr/bin/env bash
# The admission webhook's added latency to Pod creation, side by side: PODS annotated Pods in an
# opted-in namespace that enbi's webhook serves, and the same PODS in an opted-in namespace that
# no webhook serves (the baseline), created alternately (on/off, then off/on, ...) over one
# kept-alive connection, each CREATE timed on the client. Prints p50/p99 of both, the added
# latency (difference of the percentiles) and their ratio, and the operator's own histogram
# (enbi_webhook_admission_duration_seconds) and the apiserver's over the same requests.
# Every Pod carries a gate of the bench's own (`enbi.bench/hold`), so that none is scheduled in
# either namespace: only the webhook differs.
# Usage: bench/webhook-latency.sh [PODS] [BINARY]   (default 200; the release operator)
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/cluster/lib.sh
# shellcheck source=webhook.sh
source bench/webhook.sh
PODS=${1:-200}
WARMUP=20
KUBECTL="$K8S_BIN/kubectl"
KUBECONFIG="$(tests/cluster/up)"
export KUBECONFIG
if [[ -n "${2:-}" ]]; then BIN=$2; else
  cargo build -q --release -p enbi-operator
  BIN=${CARGO_TARGET_DIR:-target}/release/enbi-operator
fi
PORT=${BENCH_WEBHOOK_PORT:-19490}
METRICS=${BENCH_METRICS_ADDRESS:-127.0.0.1:18096}
ON=bench-wh-on OFF=bench-wh-off BNS=bench-wh-b
OUT=$(mktemp -d)
"$BIN" crd | "$KUBECTL" apply --server-side --force-conflicts --field-manager=enbi-bench -f - >/dev/null
"$KUBECTL" wait --for=condition=Established crd/nixbuilds.enbi.hrzn.ee >/dev/null

cleanup() {
  kill "${OP:-}" 2>/dev/null || true
  "$KUBECTL" delete mutatingwebhookconfiguration bench-webhook-latency --ignore-not-found >/dev/null 2>&1 || true
  for ns in "$ON" "$OFF"; do
    for nb in $("$KUBECTL" -n "$ns" get nixbuilds -o name 2>/dev/null); do
      "$KUBECTL" -n "$ns" patch "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
    done
  done
  "$KUBECTL" delete ns "$ON" "$OFF" "$BNS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  rm -rf "$OUT"
}
trap cleanup EXIT
for ns in "$ON" "$OFF" "$BNS"; do "$KUBECTL" delete ns "$ns" --ignore-not-found --wait --timeout=300s >/dev/null; done
for ns in "$ON" "$OFF"; do
  "$KUBECTL" create ns "$ns" >/dev/null
  "$KUBECTL" label ns "$ns" enbi.hrzn.ee/pod-builds=enabled >/dev/null
done
"$KUBECTL" create ns "$BNS" >/dev/null
"$KUBECTL" -n "$BNS" create serviceaccount enbi-builder >/dev/null

POD_NAMESPACE="$BNS" RUST_LOG=warn "$BIN" run --build-namespace "$BNS" --builder-image localhost/enbi:bench \
  --listen-address "$METRICS" --webhook-configuration bench-webhook-latency \
  --webhook-address "127.0.0.1:$PORT" --webhook-hosts 127.0.0.1 \
  >"$STATE_DIR/logs/bench-webhook-latency-operator.log" 2>&1 &
OP=$!
until curl -sf "$METRICS/readyz" >/dev/null; do sleep 0.2; done
apply_webhook bench-webhook-latency "$ON" "$PORT"

apiserver_histogram() {
  "$KUBECTL" get --raw /metrics | grep '^apiserver_admission_webhook_admission_duration_seconds_bucket' |
    grep 'name="pods.enbi.hrzn.ee"' | grep 'operation="CREATE"' || true
}
operator_histogram() { curl -sf "$METRICS/metrics" | grep '^enbi_webhook_admission_duration_seconds_bucket{' | grep 'decision="gated"' || true; }

"$KUBECTL" config view --raw --minify -o json >"$OUT/kubeconfig.json"
python3 - "$OUT" "$ON" "$OFF" "$PODS" "$WARMUP" <<'PY' &
import base64, http.client, json, os, ssl, sys, tempfile, time, urllib.parse
out, on, off, pods, warmup = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
cfg = json.load(open(f"{out}/kubeconfig.json"))
cluster, user = cfg["clusters"][0]["cluster"], cfg["users"][0]["user"]
def tmp(data):
    f = tempfile.NamedTemporaryFile(dir=out, delete=False); f.write(base64.b64decode(data)); f.close(); return f.name
ctx = ssl.create_default_context(cafile=tmp(cluster["certificate-authority-data"]))
ctx.load_cert_chain(tmp(user["client-certificate-data"]), tmp(user["client-key-data"]))
url = urllib.parse.urlparse(cluster["server"])
conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx)
def pod(name):
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": {
        "enbi.hrzn.ee/nixbuild-flakeUrl": "github:example/app",
        "enbi.hrzn.ee/nixbuild-imageTag": "enbi.bench/latency:v1",
        "enbi.hrzn.ee/nixbuild-packageName": "app",
        "enbi.hrzn.ee/nixbuild-system": "x86_64-linux"}},
        "spec": {"schedulingGates": [{"name": "enbi.bench/hold"}],
                 "containers": [{"name": "app", "image": "enbi.bench/latency:v1", "imagePullPolicy": "IfNotPresent"}]}})
def create(ns, name):
    body = pod(name)
    start = time.perf_counter()
    conn.request("POST", f"/api/v1/namespaces/{ns}/pods", body, {"Content-Type": "application/json"})
    response = conn.getresponse(); answer = response.read()
    took = time.perf_counter() - start
    assert response.status == 201, (response.status, answer[:300])
    gated = any(g["name"] == "enbi.hrzn.ee/image" for g in json.loads(answer)["spec"].get("schedulingGates", []))
    return took, gated
for i in range(warmup):
    create(on, f"warm{i}"); create(off, f"warm{i}")
open(f"{out}/warm", "w").close()
while not os.path.exists(f"{out}/go"): time.sleep(0.05)
times = {on: [], off: []}; gated = {on: 0, off: 0}
for i in range(pods):
    for ns in ((on, off) if i % 2 == 0 else (off, on)):
        took, g = create(ns, f"p{i}")
        times[ns].append(took); gated[ns] += g
def pct(xs, q):  # nearest rank
    xs = sorted(xs); return xs[max(0, -(-len(xs) * q // 100) - 1)]
with open(f"{out}/result", "w") as f:
    for label, ns in (("webhook", on), ("no webhook", off)):
        xs = [x * 1000 for x in times[ns]]
        f.write(f"{label:>11}: p50 {pct(xs, 50):6.2f} ms  p99 {pct(xs, 99):6.2f} ms  max {max(xs):6.2f} ms  (n={len(xs)}, gated {gated[ns]})\n")
    a = [x * 1000 for x in times[on]]; b = [x * 1000 for x in times[off]]
    f.write(f"      added: p50 {pct(a, 50) - pct(b, 50):+6.2f} ms  p99 {pct(a, 99) - pct(b, 99):+6.2f} ms\n")
    f.write(f"      ratio: p50 {pct(a, 50) / pct(b, 50):.2f}x  p99 {pct(a, 99) / pct(b, 99):.2f}x\n")
PY
CLIENT=$!
until [[ -e "$OUT/warm" ]] || ! kill -0 "$CLIENT" 2>/dev/null; do sleep 0.1; done
apiserver_histogram >"$OUT/api-before"; operator_histogram >"$OUT/op-before"
touch "$OUT/go"
wait "$CLIENT"
apiserver_histogram >"$OUT/api-after"; operator_histogram >"$OUT/op-after"
echo "== $PODS Pod CREATEs each, alternated, timed on the client (after $WARMUP each to warm up)"
cat "$OUT/result"
python3 - "$OUT" <<'PY'
import re, sys
out = sys.argv[1]
def read(path):
    counts = {}
    for line in open(path):
        m = re.search(r'le="([^"]+)"', line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            counts[le] = counts.get(le, 0) + float(line.split()[-1])
    return counts
for name, what in (("op", "operator (enbi_webhook_admission_duration_seconds, gated)"),
                   ("api", "apiserver (apiserver_admission_webhook_admission_duration_seconds)")):
    before, after = read(f"{out}/{name}-before"), read(f"{out}/{name}-after")
    les = sorted((le, after[le] - before.get(le, 0)) for le in after)
    if not les or les[-1][1] == 0:
        print(f"{what}: no samples"); continue
    total = les[-1][1]
    bounds = [f"p{q} <= {next(le for le, n in les if n >= q / 100 * total) * 1000:g} ms" for q in (50, 99)]
    print(f"{what}: {', '.join(bounds)} ({int(total)} calls)")
PY
