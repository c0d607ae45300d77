#!/usr/bin/env bash
# Tests the Timoni module (timoni/) with the real Timoni CLI against the local cluster of real
# Kubernetes components and its local OCI registry:
#   mod vet, build (values, bad values, examples/values-*.cue), server-side dry run;
#   mod push of two releases to the registry, apply (install) from OCI, status, list, inspect;
#   RBAC of the operator (kubectl auth can-i);
#   apply --diff, upgrade (a resource pruned through Timoni's inventory, a new image), rollback
#   (the previous release applied again), a module digest that does not match;
#   image digest pinning with an image pushed by tests/tools/push-image;
#   delete (the CRD and the NixBuilds stay);
#   the bundle in examples/ (bundle vet, apply, status, delete);
#   with real nodes: the operator image pushed, a release whose image it is installed from OCI,
#   the image pulled by a real node from the registry (Pod image, imageID digest, Pulled Event).
#
#   tests/timoni.sh            uses $KUBECONFIG if set, else starts (or reuses) tests/cluster
#
# The registry is tests/cluster/registry's (started here if it is not running).
# Prints one line per check and ends with "N passed, N failed"; exits non-zero on any failure.
# Cleans up what it created; the NixBuild CRD is removed only if it did not exist before.
set -euo pipefail

root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
# shellcheck source=tests/cluster/lib.sh
source "$root/tests/cluster/lib.sh"
kubectl="$K8S_BIN/kubectl"

PATH="$("$root/tests/tools/install"):$PATH"
if [[ -z "${KUBECONFIG:-}" ]]; then
  KUBECONFIG="$("$root/tests/cluster/up")"
fi
export KUBECONFIG
registry="$("$root/tests/cluster/registry" up)"

module="$root/timoni"
instance=enbi
ns=enbi-system
build_ns=enbi-builds
sa="system:serviceaccount:$ns:enbi-operator"
app_ns="enbi-timoni-test-$$"
crd=nixbuilds.enbi.hrzn.ee
# The module's repository in the local registry; per run, so that concurrent runs (and earlier
# ones) cannot change the versions this run pushed.
repo="oci://$registry/enbi-test-$$/enbi"
work="$(mktemp -d)"

# Timoni keeps pulled modules in a cache; a private one leaves nothing behind.
tm() { timoni --cache-dir "$work/timoni-cache" "$@"; }

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok     $*"; }
fail() { failed=$((failed + 1)); echo "FAILED $*"; }
# check DESCRIPTION COMMAND...: passes when COMMAND succeeds; its output is shown on failure.
check() {
  local what="$1"; shift
  if "$@" > "$work/out" 2>&1; then pass "$what"; else fail "$what"; sed 's/^/       | /' "$work/out"; fi
}
# check_fails DESCRIPTION PATTERN COMMAND...: passes when COMMAND fails and its output has PATTERN.
check_fails() {
  local what="$1" pattern="$2"; shift 2
  if "$@" > "$work/out" 2>&1; then
    fail "$what (it succeeded)"
  elif grep -qE -- "$pattern" "$work/out"; then
    pass "$what: $(grep -E -m1 -- "$pattern" "$work/out" | sed 's/^ *//')"
  else
    fail "$what (no match for /$pattern/)"; sed 's/^/       | /' "$work/out"
  fi
}
# equals DESCRIPTION WANT COMMAND...: passes when COMMAND prints exactly WANT.
equals() {
  local what="$1" want="$2" got; shift 2
  got="$("$@" 2>&1)" || true
  if [[ "$got" == "$want" ]]; then pass "$what ($got)"; else fail "$what: want '$want', got '$got'"; fi
}
# has DESCRIPTION PATTERN FILE: passes when FILE (a command's saved output) has PATTERN.
has() {
  if grep -qE -- "$2" "$3"; then pass "$1: $(grep -E -m1 -- "$2" "$3" | sed 's/^ *//')"
  else fail "$1 (no match for /$2/)"; sed 's/^/       | /' "$3"; fi
}

crd_existed=false
if "$kubectl" get crd "$crd" > /dev/null 2>&1; then crd_existed=true; fi

# listed: the instance's row of `timoni list` (NAME MODULE VERSION LAST-APPLIED BUNDLE) as
# "MODULE VERSION BUNDLE"; installed: whether there is one.
listed() { tm list -n "$ns" 2>&1 | awk -v n="$instance" '$1 == n {print $2, $3, $5}'; }
installed() { [[ -n "$(listed)" ]]; }

cleanup() {
  set +e
  tm bundle delete enbi --wait=false > /dev/null 2>&1
  if installed; then tm delete "$instance" -n "$ns" --wait=false > /dev/null 2>&1; fi
  # NixBuilds of the test namespace: drop finalizers so that the namespace can go.
  for nb in $("$kubectl" get nixbuilds -n "$app_ns" -o name 2>/dev/null); do
    "$kubectl" patch -n "$app_ns" "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' > /dev/null 2>&1
  done
  "$kubectl" delete namespace "$app_ns" "$ns" "$build_ns" --ignore-not-found --wait=false > /dev/null 2>&1
  "$kubectl" delete clusterrole,clusterrolebinding,mutatingwebhookconfiguration,validatingwebhookconfiguration -l app.kubernetes.io/instance="$instance",app.kubernetes.io/name=enbi \
    --ignore-not-found > /dev/null 2>&1
  if $crd_existed; then
    # Someone else's CRD: take back the labels that the install added.
    "$kubectl" label crd "$crd" app.kubernetes.io/component- app.kubernetes.io/instance- \
      app.kubernetes.io/managed-by- app.kubernetes.io/name- app.kubernetes.io/version- \
      instance.timoni.sh/name- instance.timoni.sh/namespace- > /dev/null 2>&1
    "$kubectl" annotate crd "$crd" action.timoni.sh/prune- > /dev/null 2>&1
  else
    "$kubectl" delete crd "$crd" --ignore-not-found --wait=false > /dev/null 2>&1
  fi
  # The repository this run pushed (the registry's storage is the cluster's state dir).
  for tag in $(crane ls "${repo#oci://}" 2>/dev/null); do
    crane delete "${repo#oci://}@$(crane digest "${repo#oci://}:$tag" 2>/dev/null)" > /dev/null 2>&1
  done
  for tag in $(crane ls "$registry/enbi-test-$$/enbi-operator" 2>/dev/null); do
    crane delete "$registry/enbi-test-$$/enbi-operator@$(crane digest "$registry/enbi-test-$$/enbi-operator:$tag")" > /dev/null 2>&1
  done
  rm -rf "$work"
}
trap cleanup EXIT

echo "== $(tm version 2>/dev/null | awk '/^client/ {print "timoni " $2} /^cue/ {print "(cue " $2 ")"}' | xargs)"
echo "== cluster: $("$kubectl" version -o json | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p' | tail -1), registry: $registry"

# A leftover instance or bundle from an interrupted run.
tm bundle delete enbi > /dev/null 2>&1 || true
if installed; then tm delete "$instance" -n "$ns" > /dev/null 2>&1 || true; fi

# jsonpath of the operator Deployment.
deploy() { "$kubectl" get deployment -n "$ns" enbi-operator -o jsonpath="$1"; }
env_of() { deploy "{.spec.template.spec.containers[0].env[?(@.name==\"$1\")].value}"; }

echo "== vet and build (./timoni)"
check "timoni mod vet" tm mod vet "$module" --name "$instance" -n "$ns"
check "timoni build" sh -c "timoni build '$instance' '$module' -n '$ns' > '$work/build.yaml'"
equals "the build has the expected objects" \
  "ClusterRole ClusterRoleBinding CustomResourceDefinition Deployment MutatingWebhookConfiguration Namespace Namespace Role Role Role RoleBinding RoleBinding RoleBinding Service Service ServiceAccount ServiceAccount ValidatingWebhookConfiguration" \
  sh -c "grep '^kind:' '$work/build.yaml' | awk '{print \$2}' | sort | xargs"
equals "Pod Security privileged on the build namespace only" "$build_ns" \
  sh -c "timoni build '$instance' '$module' -n '$ns' -o json | python3 -c '
import json, sys
for o in json.load(sys.stdin)[\"items\"]:
    if o[\"metadata\"].get(\"labels\", {}).get(\"pod-security.kubernetes.io/enforce\") == \"privileged\":
        print(o[\"metadata\"][\"name\"])'"
equals "a module from a path is version 0.0.0-devel" "0.0.0-devel" \
  sh -c "grep -m1 'app.kubernetes.io/version:' '$work/build.yaml' | awk '{print \$2}'"

cat > "$work/otel.cue" <<'CUE'
values: {
	telemetry: otlpEndpoint: "http://otel-collector.observability:4317"
	env: OTEL_EXPORTER_OTLP_HEADERS: "x-team=builds"
}
CUE
check "OTel endpoint and extra env reach the operator" sh -c \
  "timoni build '$instance' '$module' -n '$ns' -f '$work/otel.cue' > '$work/otel.yaml' &&
   grep -A1 'name: OTEL_EXPORTER_OTLP_ENDPOINT' '$work/otel.yaml' | grep -q 'value: http://otel-collector.observability:4317' &&
   grep -A1 'name: OTEL_EXPORTER_OTLP_HEADERS' '$work/otel.yaml' | grep -q 'value: x-team=builds'"
check "no OTLP endpoint by default" sh -c "! grep -q OTEL_EXPORTER_OTLP_ENDPOINT '$work/build.yaml'"
check "examples/values-k3s.cue: k3s's containerd socket, a mirror" sh -c \
  "timoni build '$instance' '$module' -n '$ns' -f '$root/examples/values-k3s.cue' > '$work/k3s.yaml' &&
   grep -A1 'name: ENBI_CONTAINERD_SOCKET' '$work/k3s.yaml' | grep -q 'value: /run/k3s/containerd/containerd.sock' &&
   grep -A1 'name: ENBI_IMAGE_MIRROR' '$work/k3s.yaml' | grep -q 'value: \"true\"'"
check "examples/values-eks.cue: the default socket, no mirror" sh -c \
  "timoni build '$instance' '$module' -n '$ns' -f '$root/examples/values-eks.cue' > '$work/eks.yaml' &&
   grep -A1 'name: ENBI_CONTAINERD_SOCKET' '$work/eks.yaml' | grep -q 'value: /run/containerd/containerd.sock' &&
   grep -A1 'name: ENBI_IMAGE_MIRROR' '$work/eks.yaml' | grep -q 'value: \"false\"'"
check "one replica without leader election: Recreate, never two operators" \
  sh -c "grep -A1 '^  strategy:' '$work/build.yaml' | grep -q 'type: Recreate'"
check "public registries protected by default" sh -c "grep -A1 'name: ENBI_PROTECTED_REGISTRIES' '$work/build.yaml' | grep -q 'value: docker.io,ghcr.io,'"
check "builder limits by default" sh -c "grep -A1 'name: ENBI_BUILDER_LIMITS' '$work/build.yaml' | grep -q 'value: cpu=4,memory=8Gi,ephemeral-storage=20Gi'"
check "text logs by default" sh -c "grep -A1 'name: ENBI_LOG_FORMAT' '$work/build.yaml' | grep -q 'value: text'"
cat > "$work/monitoring.cue" <<'CUE'
values: {
	logging: format: "json"
	monitoring: {
		serviceMonitor: {enabled: true, labels: release: "prom"}
		prometheusRule: {enabled: true, labels: release: "prom", alertLabels: team: "builds"}
	}
}
CUE
check "monitoring values: a ServiceMonitor and a PrometheusRule with the labels, JSON logs" sh -c \
  "timoni build '$instance' '$module' -n '$ns' -f '$work/monitoring.cue' -o json | python3 -c '
import json, sys
items = json.load(sys.stdin)[\"items\"]
kinds = {o[\"kind\"]: o for o in items}
assert kinds[\"ServiceMonitor\"][\"metadata\"][\"labels\"][\"release\"] == \"prom\"
rule = kinds[\"PrometheusRule\"]
assert rule[\"metadata\"][\"labels\"][\"release\"] == \"prom\"
assert all(r[\"labels\"][\"team\"] == \"builds\" for g in rule[\"spec\"][\"groups\"] for r in g[\"rules\"])
env = {e[\"name\"]: e.get(\"value\") for e in kinds[\"Deployment\"][\"spec\"][\"template\"][\"spec\"][\"containers\"][0][\"env\"]}
assert env[\"ENBI_LOG_FORMAT\"] == \"json\"'"

echo "== bad values are refused, naming the field"
cat > "$work/negative.cue" <<'CUE'
values: history: keepSucceeded: -1
CUE
cat > "$work/store.cue" <<'CUE'
values: build: storeMode: "host"
CUE
cat > "$work/samens.cue" <<'CUE'
values: build: namespace: "enbi-system"
CUE
cat > "$work/env.cue" <<'CUE'
values: env: ENBI_KEEP_FAILED: "1"
CUE
cat > "$work/baddigest.cue" <<'CUE'
values: image: digest: "sha256:1234"
CUE
check_fails "negative history limit" 'history.keepSucceeded: invalid value -1 \(out of bound >=0\)' \
  timoni build "$instance" "$module" -n "$ns" -f "$work/negative.cue"
check_fails "unknown store mode" 'build.storeMode: (2 errors in empty disjunction|conflicting values)' \
  timoni build "$instance" "$module" -n "$ns" -f "$work/store.cue"
check_fails "build namespace = operator namespace" 'build.namespace: invalid value "enbi-system" \(out of bound !="enbi-system"\)' \
  timoni build "$instance" "$module" -n "$ns" -f "$work/samens.cue"
check_fails "ENBI_* in extra env" 'env.ENBI_KEEP_FAILED: field not allowed' \
  timoni build "$instance" "$module" -n "$ns" -f "$work/env.cue"
check_fails "an image digest that is not sha256:<64 hex>" 'image.digest: invalid value "sha256:1234" \(out of bound' \
  timoni build "$instance" "$module" -n "$ns" -f "$work/baddigest.cue"
check_fails "instance in the default namespace" 'metadata.namespace: invalid value "default" \(out of bound !="default"\)' \
  timoni build "$instance" "$module" -n default
check_fails "apply refuses bad values before touching the cluster" 'history.keepSucceeded: invalid value -1' \
  tm apply "$instance" "$module" -n "$ns" -f "$work/negative.cue"
equals "... and applied nothing" "" \
  sh -c "'$kubectl' get namespace '$ns' --ignore-not-found -o name; '$kubectl' get secret -n '$ns' 'timoni.$instance' --ignore-not-found -o name 2>/dev/null"

echo "== image pinned by digest (tests/tools/push-image to the local registry)"
# A one-layer OCI image archive, as a Nix or other image build would leave one; prints the
# digest of its manifest.
archive_digest="$(python3 - "$work/image.tar" <<'PY'
import hashlib, io, json, sys, tarfile
def tar_bytes(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in files:
            info = tarfile.TarInfo(name); info.size = len(data); info.mtime = 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()
blobs = {}
def blob(data):
    d = hashlib.sha256(data).hexdigest(); blobs[d] = data
    return {"digest": "sha256:" + d, "size": len(data)}
layer = tar_bytes([("hello", b"enbi timoni test\n")])
config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/hello"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(layer)}]}).encode()
index = json.dumps({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    **blob(manifest)}]}).encode()
files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
files += [("blobs/sha256/" + d, data) for d, data in blobs.items()]
open(sys.argv[1], "wb").write(tar_bytes(files))
print("sha256:" + hashlib.sha256(manifest).hexdigest())
PY
)"
image_repo="$registry/enbi-test-$$/enbi-operator"
check "push-image: the archive to the registry" \
  sh -c "'$root/tests/tools/push-image' '$work/image.tar' '$image_repo:pinned' > '$work/pushed'"
image_ref="$(cat "$work/pushed" 2>/dev/null || true)"
image_digest="${image_ref##*@}"
equals "push-image prints the archive's manifest digest" "$archive_digest" echo "$image_digest"
equals "the registry serves the tag at that digest" "$archive_digest" crane digest "$image_repo:pinned"
cat > "$work/pinned.cue" <<CUE
values: image: {repository: "$image_repo", tag: "pinned", digest: "$image_digest"}
CUE
equals "the operator and the builders use repository@digest" "$image_repo@$image_digest $image_repo@$image_digest" \
  sh -c "timoni build '$instance' '$module' -n '$ns' -f '$work/pinned.cue' -o json | python3 -c '
import json, sys
for o in json.load(sys.stdin)[\"items\"]:
    if o[\"kind\"] == \"Deployment\":
        c = o[\"spec\"][\"template\"][\"spec\"][\"containers\"][0]
        print(c[\"image\"], [e[\"value\"] for e in c[\"env\"] if e[\"name\"] == \"ENBI_BUILDER_IMAGE\"][0])'"

echo "== two releases in the registry (timoni mod push)"
# Release N of the module defaults to operator image N: 0.2.0 is the module with the image tag
# moved on, as the next release would be.
cp -R "$module" "$work/mod-0.1.0"
cp -R "$module" "$work/mod-0.2.0"
python3 - "$work/mod-0.2.0/values.cue" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
s, n = re.subn(r'(image: \{\s*repository: "localhost/enbi"\s*tag:\s*)"[^"]*"', r'\1"0.2.0"', s)
assert n == 1, "values.cue: no image tag to change"
open(p, "w").write(s)
PY
for v in 0.1.0 0.2.0; do
  check "timoni mod push $v" sh -c \
    "timoni mod push '$work/mod-$v' '$repo' --version $v -o json > '$work/push-$v.json'"
done
digest_of() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["digest"])' "$work/push-$1.json" 2>/dev/null; }
d1="$(digest_of 0.1.0)"
d2="$(digest_of 0.2.0)"
check "the two releases differ" test -n "$d1" -a -n "$d2" -a "$d1" != "$d2"
tm mod list "$repo" > "$work/mod-list" 2>&1 || true
has "timoni mod list shows 0.1.0 at its digest" "^0\.1\.0[[:space:]]+$d1" "$work/mod-list"
has "timoni mod list shows 0.2.0 at its digest" "^0\.2\.0[[:space:]]+$d2" "$work/mod-list"
# (timoni build stamps every module 0.0.0-devel; apply stamps the version it pulled, checked below.)
check "timoni build of the pushed 0.2.0 has its image" sh -c \
  "timoni --cache-dir '$work/timoni-cache' build '$instance' '$repo' --version 0.2.0 -n '$ns' > '$work/build-0.2.0.yaml' &&
   grep -q 'image: localhost/enbi:0.2.0' '$work/build-0.2.0.yaml'"
check "the artifact leaves out the module's scripts (timoni.ignore)" sh -c \
  "timoni --cache-dir '$work/timoni-cache' mod pull '$repo' --version 0.1.0 -o '$work/pulled' &&
   test -f '$work/pulled/timoni.cue' && test ! -e '$work/pulled/generate' && test ! -e '$work/pulled/values-table'"

# Namespaced objects cannot be dry-run before their namespace exists: Timoni creates the
# instance namespace first, then dry-runs everything on the server.
echo "== server-side dry run"
check "timoni apply --dry-run (from the registry)" tm apply "$instance" "$repo" --version 0.1.0 -n "$ns" --dry-run
equals "... and applied nothing" "" \
  sh -c "'$kubectl' get deployment -n '$ns' --ignore-not-found -o name; '$kubectl' get clusterrole enbi-operator --ignore-not-found -o name"

echo "== install 0.1.0 from the registry"
# The test Job (test.enabled): a resource that the upgrade below drops.
cat > "$work/install.cue" <<'CUE'
values: test: enabled: true
CUE
check "timoni apply $instance $repo --version 0.1.0 -n $ns (waits until ready)" \
  tm apply "$instance" "$repo" --version 0.1.0 -n "$ns" -f "$work/install.cue" --timeout 3m
check "CRD $crd is Established" "$kubectl" wait --for=condition=Established "crd/$crd" --timeout=60s
equals "the CRD is kept by Timoni on delete" "disabled" \
  "$kubectl" get crd "$crd" -o jsonpath='{.metadata.annotations.action\.timoni\.sh/prune}'
equals "Deployment $ns/enbi-operator is available" "1" deploy '{.status.availableReplicas}'
equals "image of release 0.1.0" "localhost/enbi:0.1.0" deploy '{.spec.template.spec.containers[0].image}'
equals "version label of release 0.1.0" "0.1.0" deploy '{.metadata.labels.app\.kubernetes\.io/version}'
check "Service $ns/enbi-metrics exists" "$kubectl" get service -n "$ns" enbi-metrics
equals "the test Job ran to completion" "True" \
  "$kubectl" get job -n "$ns" enbi-test -o jsonpath='{.status.conditions[?(@.type=="Complete")].status}'
equals "builder ServiceAccount mounts no token" "false" \
  "$kubectl" get serviceaccount -n "$build_ns" enbi-builder -o jsonpath='{.automountServiceAccountToken}'
equals "build namespace enforces Pod Security privileged" "privileged" \
  "$kubectl" get namespace "$build_ns" -o jsonpath='{.metadata.labels.pod-security\.kubernetes\.io/enforce}'
equals "operator namespace enforces Pod Security restricted" "restricted" \
  "$kubectl" get namespace "$ns" -o jsonpath='{.metadata.labels.pod-security\.kubernetes\.io/enforce}'
equals "timoni list: the instance's module, version, bundle" "$repo 0.1.0 -" listed
tm status "$instance" -n "$ns" > "$work/status" 2>&1 || true
has "timoni status: the module version" "module ${repo}:0\.1\.0" "$work/status"
has "timoni status: the digest pushed for 0.1.0" "digest $d1" "$work/status"
has "timoni status: the Deployment is Current" "Deployment/$ns/enbi-operator Current" "$work/status"
tm inspect resources "$instance" -n "$ns" > "$work/resources" 2>&1 || true
has "the inventory has the test Job" "^job/enbi-test[[:space:]]+${ns}[[:space:]]" "$work/resources"
has "the inventory has the CRD" "^customresourcedefinition/${crd}[[:space:]]" "$work/resources"

echo "== RBAC of $sa"
can() { "$kubectl" auth can-i --as="$sa" "$@" 2> /dev/null; }
for args in \
  "get nixbuilds.enbi.hrzn.ee -A" "list nixbuilds.enbi.hrzn.ee -A" "watch nixbuilds.enbi.hrzn.ee -A" \
  "create nixbuilds.enbi.hrzn.ee -n default" "patch nixbuilds.enbi.hrzn.ee -n default" \
  "delete nixbuilds.enbi.hrzn.ee -n default" \
  "get nixbuilds.enbi.hrzn.ee --subresource=status -n default" \
  "patch nixbuilds.enbi.hrzn.ee --subresource=status -n default" \
  "update nixbuilds.enbi.hrzn.ee --subresource=finalizers -n default" \
  "list pods -A" "watch pods -A" "get nodes" "watch nodes" \
  "create events.events.k8s.io -n default" "patch events.events.k8s.io -n default" \
  "get customresourcedefinitions.apiextensions.k8s.io/$crd" \
  "watch customresourcedefinitions.apiextensions.k8s.io/$crd" \
  "create jobs.batch -n $build_ns" "delete jobs.batch -n $build_ns" "watch jobs.batch -n $build_ns" \
  "get pods -n $build_ns" \
  "create leases.coordination.k8s.io -n $ns" "update leases.coordination.k8s.io -n $ns" \
  "patch pods -A" "delete pods -A" "watch namespaces" \
  "patch mutatingwebhookconfigurations.admissionregistration.k8s.io/$instance-webhook" \
  "patch validatingwebhookconfigurations.admissionregistration.k8s.io/$instance-webhook" \
  "get secrets/$instance-webhook-tls -n $ns" "update secrets/$instance-webhook-tls -n $ns" "create secrets -n $ns"; do
  # shellcheck disable=SC2086
  equals "can $args" yes can $args
done
for args in \
  "get secrets -n $ns" "list secrets -A" "get configmaps -n $ns" "update nixbuilds.enbi.hrzn.ee -n default" \
  "update nixbuilds.enbi.hrzn.ee --subresource=status -n default" \
  "create pods -n $build_ns" "patch nodes" "update secrets/other -n $ns" "create secrets -n default" \
  "patch mutatingwebhookconfigurations.admissionregistration.k8s.io/other" \
  "patch validatingwebhookconfigurations.admissionregistration.k8s.io/other" \
  "list customresourcedefinitions.apiextensions.k8s.io" \
  "get customresourcedefinitions.apiextensions.k8s.io/other.example.com" \
  "create jobs.batch -n default" "create leases.coordination.k8s.io -n default" \
  "create events -n default" "impersonate serviceaccounts -A"; do
  # shellcheck disable=SC2086
  equals "cannot $args" no can $args
done

echo "== upgrade to 0.2.0 keeps NixBuilds, prunes what it no longer renders"
"$kubectl" create namespace "$app_ns" > /dev/null
cat > "$work/nixbuild.yaml" <<YAML
apiVersion: enbi.hrzn.ee/v1alpha1
kind: NixBuild
metadata:
  name: timoni-upgrade
  namespace: $app_ns
spec:
  flakeUrl: git+https://example.test/flake?rev=f5d531177a7330e9b270c15cca5df0eb72b8684c
  packageName: app-docker.stream-layered
  imageTag: example.test/app:timoni
  system: x86_64-linux
YAML
check "create a NixBuild" "$kubectl" apply -f "$work/nixbuild.yaml"
uid="$("$kubectl" get nixbuild -n "$app_ns" timoni-upgrade -o jsonpath='{.metadata.uid}' 2>/dev/null || true)"
# No test Job (test.enabled is false by default): the upgrade must prune it.
cat > "$work/upgrade.cue" <<'CUE'
values: {
	replicas: 2
	history: keepSucceeded: 3
}
CUE
check "timoni apply --diff (0.1.0 -> 0.2.0)" sh -c \
  "timoni --cache-dir '$work/timoni-cache' apply '$instance' '$repo' --version 0.2.0 -n '$ns' -f '$work/upgrade.cue' --diff > '$work/diff' 2>&1"
has "the diff shows the new image" "localhost/enbi:0\.2\.0" "$work/diff"
has "the diff shows the test Job going" "Job/$ns/enbi-test deleted" "$work/diff"
equals "... and changed nothing" "localhost/enbi:0.1.0 1" deploy '{.spec.template.spec.containers[0].image} {.spec.replicas}'

check "timoni apply --version 0.2.0 (replicas 2, keepSucceeded 3, no test Job)" sh -c \
  "timoni --cache-dir '$work/timoni-cache' apply '$instance' '$repo' --version 0.2.0 -n '$ns' -f '$work/upgrade.cue' --timeout 3m > '$work/upgrade' 2>&1"
has "Timoni pruned the test Job" "Job/$ns/enbi-test deleted" "$work/upgrade"
check "the test Job is gone" sh -c "! '$kubectl' get job -n '$ns' enbi-test -o name 2>/dev/null | grep -q ."
tm inspect resources "$instance" -n "$ns" > "$work/resources" 2>&1 || true
check "the inventory no longer has the test Job" sh -c "! grep -q '^job/enbi-test' '$work/resources' && grep -q '^deployment/enbi-operator' '$work/resources'"
equals "image of release 0.2.0" "localhost/enbi:0.2.0" deploy '{.spec.template.spec.containers[0].image}'
equals "version label of release 0.2.0" "0.2.0" deploy '{.metadata.labels.app\.kubernetes\.io/version}'
equals "Deployment replicas" 2 deploy '{.spec.replicas}'
equals "ENBI_KEEP_SUCCEEDED" 3 env_of ENBI_KEEP_SUCCEEDED
equals "ENBI_LEADER_ELECTION with 2 replicas" true env_of ENBI_LEADER_ELECTION
equals "rolling updates with leader election" RollingUpdate deploy '{.spec.strategy.type}'
equals "the NixBuild survived the upgrade (same uid)" "$uid" \
  "$kubectl" get nixbuild -n "$app_ns" timoni-upgrade -o jsonpath='{.metadata.uid}'
tm status "$instance" -n "$ns" > "$work/status" 2>&1 || true
has "timoni status: the digest pushed for 0.2.0" "digest $d2" "$work/status"

echo "== rollback: 0.1.0 and its values again"
check_fails "a module digest that does not match the version is refused" "digest mismatch" \
  tm apply "$instance" "$repo" --version 0.1.0 --digest "$d2" -n "$ns" -f "$work/install.cue"
equals "... and changed nothing" "localhost/enbi:0.2.0" deploy '{.spec.template.spec.containers[0].image}'
check "timoni apply --version 0.1.0 --digest <0.1.0's>" \
  tm apply "$instance" "$repo" --version 0.1.0 --digest "$d1" -n "$ns" -f "$work/install.cue" --timeout 3m
equals "image of release 0.1.0 again" "localhost/enbi:0.1.0" deploy '{.spec.template.spec.containers[0].image}'
equals "version label 0.1.0 again" "0.1.0" deploy '{.metadata.labels.app\.kubernetes\.io/version}'
equals "one replica, Recreate, no leader election again" "1 Recreate false" \
  sh -c "'$kubectl' get deployment -n '$ns' enbi-operator -o jsonpath='{.spec.replicas} {.spec.strategy.type} {.spec.template.spec.containers[0].env[?(@.name==\"ENBI_LEADER_ELECTION\")].value}'"
equals "ENBI_KEEP_SUCCEEDED back to its default" 10 env_of ENBI_KEEP_SUCCEEDED
equals "the test Job is back and ran" "True" \
  "$kubectl" get job -n "$ns" enbi-test -o jsonpath='{.status.conditions[?(@.type=="Complete")].status}'
equals "timoni list: version 0.1.0" "$repo 0.1.0 -" listed
equals "the NixBuild survived the rollback (same uid)" "$uid" \
  "$kubectl" get nixbuild -n "$app_ns" timoni-upgrade -o jsonpath='{.metadata.uid}'

echo "== delete keeps the CRD and the NixBuilds"
check "timoni delete $instance -n $ns" tm delete "$instance" -n "$ns" --timeout 3m
check "CRD $crd is still there" "$kubectl" get crd "$crd"
equals "the NixBuild is still there (same uid)" "$uid" \
  "$kubectl" get nixbuild -n "$app_ns" timoni-upgrade -o jsonpath='{.metadata.uid}'
equals "Deployment is gone" "" sh -c "'$kubectl' get deployment -n '$ns' --ignore-not-found -o name"
equals "ClusterRole is gone" "" "$kubectl" get clusterrole enbi-operator --ignore-not-found -o name
equals "the namespaces are gone" "" \
  sh -c "'$kubectl' get namespace '$ns' '$build_ns' --ignore-not-found -o name"
check "timoni list no longer has the instance" sh -c "! timoni list -n '$ns' 2>/dev/null | awk 'NR > 1 {print \$1}' | grep -qx '$instance'"

echo "== the bundle of examples/ (a shared cluster), from the registry"
bundle="$root/examples/bundle.cue"
# The bundle's runtime values: the module is $ENBI_REGISTRY/enbi.
repo_path="${repo#oci://}"
export ENBI_REGISTRY="${repo_path%/enbi}" ENBI_MODULE_VERSION=0.2.0
check_fails "without ENBI_REGISTRY the bundle is incomplete" "module.url: invalid interpolation: non-concrete value string" \
  env -u ENBI_REGISTRY timoni bundle vet -f "$bundle" --runtime-from-env
check "timoni bundle vet" tm bundle vet -f "$bundle" --runtime-from-env
check "timoni bundle apply --runtime-from-env" tm bundle apply -f "$bundle" --runtime-from-env --timeout 3m
equals "timoni list: the bundle's instance, 0.2.0" "$repo 0.2.0 enbi" listed
equals "the operator image from the bundle" "$ENBI_REGISTRY/enbi-operator:0.2.0" deploy '{.spec.template.spec.containers[0].image}'
equals "watched namespaces: opt-in" "team-a,team-b" env_of ENBI_WATCH_NAMESPACES
equals "allowed namespaces" "team-a,team-b" env_of ENBI_ALLOWED_NAMESPACES
equals "allowed image tags" "team-a=localhost/team-a/*,team-b=localhost/team-b/*" env_of ENBI_ALLOWED_IMAGE_TAGS
equals "builders on the nodes' Nix daemon" "node-daemon" env_of ENBI_STORE_MODE
equals "builder tolerations" "dedicated=builds:NoSchedule" env_of ENBI_BUILDER_TOLERATIONS
equals "leader election with two replicas" "true 2" sh -c \
  "'$kubectl' get deployment -n '$ns' enbi-operator -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name==\"ENBI_LEADER_ELECTION\")].value} {.status.availableReplicas}'"
tm bundle status enbi > "$work/bstatus" 2>&1 || true
has "timoni bundle status: the instance's module" "${repo}:0\.2\.0" "$work/bstatus"
check "timoni bundle delete" tm bundle delete enbi --timeout 3m
equals "Deployment is gone" "" sh -c "'$kubectl' get deployment -n '$ns' --ignore-not-found -o name"
check "CRD $crd is still there" "$kubectl" get crd "$crd"

echo "== the operator's image pulled by a real node from the registry (release 0.3.0)"
# The operator image (the builder image of real-node: this enbi-operator, nix, ctr) pushed to the
# registry, a module release whose default image is it at the address the nodes reach the
# registry by, installed from OCI: a real node's kubelet pulls it (no import into containerd).
real_nodes="$("$root/tests/cluster/real-node" nodes 2>/dev/null || true)"
if [[ -z "$real_nodes" ]]; then
  echo "SKIPPED: no real node (tests/cluster/up --real-node, as root)"
else
  node_registry="$("$root/tests/cluster/registry" node-addr)"
  operator_bin="${ENBI_OPERATOR_BIN:-}"
  if [[ -z "$operator_bin" ]]; then
    cargo build --quiet --locked -p enbi-operator --manifest-path "$root/Cargo.toml"
    operator_bin="${CARGO_TARGET_DIR:-$root/target}/debug/enbi-operator"
  fi
  check "the operator image archive (real-node builder-archive)" \
    "$root/tests/cluster/real-node" builder-archive "$operator_bin" "$image_repo:0.3.0" "$work/operator.tar"
  check "push-image: the operator image to the registry" \
    sh -c "'$root/tests/tools/push-image' '$work/operator.tar' '$image_repo:0.3.0' > '$work/pushed-0.3.0'"
  operator_digest="$(sed 's/.*@//' "$work/pushed-0.3.0" 2>/dev/null || true)"
  pulled_image="$node_registry/${image_repo#"$registry"/}:0.3.0"
  cp -R "$module" "$work/mod-0.3.0"
  python3 - "$work/mod-0.3.0/values.cue" "${pulled_image%:*}" <<'PY3'
import re, sys
p, repo = sys.argv[1], sys.argv[2]
s = open(p).read()
s, n = re.subn(r'(image: \{\s*repository: )"localhost/enbi"(\s*tag:\s*)"[^"]*"', r'\1"%s"\2"0.3.0"' % repo, s)
assert n == 1, "values.cue: no image to change"
open(p, "w").write(s)
PY3
  check "timoni mod push 0.3.0 (its image: $pulled_image)" \
    timoni mod push "$work/mod-0.3.0" "$repo" --version 0.3.0
  # The real nodes are tainted for tests; nothing else in these values.
  cat > "$work/real.cue" <<'CUE'
values: {
	nodeSelector: type: "real"
	tolerations: [{key: "enbi.test/real-node", operator: "Exists", effect: "NoSchedule"}]
}
CUE
  check "timoni apply $instance $repo --version 0.3.0 -n $ns (on a real node)" \
    tm apply "$instance" "$repo" --version 0.3.0 -n "$ns" -f "$work/real.cue" --timeout 3m
  pod="$("$kubectl" get pods -n "$ns" -o name 2>/dev/null | grep -m1 '^pod/enbi-operator-' || true)"
  pod="${pod#pod/}"
  equals "the operator Pod's image is in the registry" "$pulled_image" \
    "$kubectl" get pod -n "$ns" "$pod" -o jsonpath='{.spec.containers[0].image}'
  equals "it runs on a real node, ready" "real True" sh -c \
    "'$kubectl' get node \"\$('$kubectl' get pod -n '$ns' '$pod' -o jsonpath='{.spec.nodeName}')\" -o jsonpath='{.metadata.labels.type}'; printf ' '; '$kubectl' get pod -n '$ns' '$pod' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}'"
  equals "the kubelet ran the pushed digest" "$operator_digest" sh -c \
    "'$kubectl' get pod -n '$ns' '$pod' -o jsonpath='{.status.containerStatuses[0].imageID}' | sed 's/.*@//'"
  "$kubectl" get events -n "$ns" --field-selector "involvedObject.name=$pod,reason=Pulled" \
    -o jsonpath='{range .items[*]}{.message}{"\n"}{end}' > "$work/pulled-events" 2>&1 || true
  has "the kubelet's Event: Pulled" "^Successfully pulled image \"$pulled_image\"" "$work/pulled-events"

  # Uninstall as README says: the NixBuilds first, while enbi runs (its finalizer releases their
  # images and must not hold them), then enbi, then the CRD.
  check "the running operator holds the NixBuild with its finalizer" sh -c \
    "for _ in \$(seq 60); do '$kubectl' get nixbuild -n '$app_ns' timoni-upgrade -o jsonpath='{.metadata.finalizers}' | grep -q enbi.hrzn.ee/cleanup && exit 0; sleep 1; done; exit 1"
  # In every namespace, as README says: the other tests' NixBuilds too.
  check "uninstall: kubectl delete nixbuilds --all -A finishes within a minute while enbi runs" \
    "$kubectl" delete nixbuilds --all -A --timeout=60s
  equals "no NixBuild is left" "" "$kubectl" get nixbuilds -A -o name
  check "timoni delete $instance" tm delete "$instance" -n "$ns" --timeout 3m
  check "uninstall: kubectl delete crd finishes within a minute" \
    "$kubectl" delete crd "$crd" --timeout=60s
fi

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
