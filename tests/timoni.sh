#!/usr/bin/env bash
# Tests the Timoni module (timoni/) against the local cluster of real Kubernetes components:
# vet, build, server-side dry run, install, upgrade, uninstall, bad values, RBAC.
#
#   tests/timoni.sh            uses $KUBECONFIG if set, else starts (or reuses) tests/cluster
#
# Runs the real Timoni CLI when tests/tools/install could install it, else the same steps with
# cue and kubectl (tests/timoni-driver; ENBI_TIMONI_DRIVER=cue forces that); the first line says
# which driver ran.
#
# Prints one line per check and ends with "N passed, N failed"; exits non-zero on any failure.
# Cleans up what it created; the NixBuild CRD is removed only if it did not exist before.
set -euo pipefail

root="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"
# shellcheck source=tests/cluster/lib.sh
source "$root/tests/cluster/lib.sh"
kubectl="$K8S_BIN/kubectl"
export KUBECTL="$kubectl"
tm="$root/tests/timoni-driver"

PATH="$("$root/tests/tools/install"):$PATH"
if [[ -z "${KUBECONFIG:-}" ]]; then
  KUBECONFIG="$("$root/tests/cluster/up")"
fi
export KUBECONFIG

instance=enbi
ns=enbi-system
build_ns=enbi-builds
sa="system:serviceaccount:$ns:enbi-operator"
app_ns="enbi-timoni-test-$$"
crd=nixbuilds.enbi.hrzn.ee
work="$(mktemp -d)"

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

crd_existed=false
if "$kubectl" get crd "$crd" > /dev/null 2>&1; then crd_existed=true; fi

cleanup() {
  set +e
  if "$tm" exists "$instance" "$ns" 2>/dev/null; then
    "$tm" delete "$instance" "$ns" > /dev/null 2>&1
  fi
  # NixBuilds of the test namespace: drop finalizers so that the namespace can go.
  for nb in $("$kubectl" get nixbuilds -n "$app_ns" -o name 2>/dev/null); do
    "$kubectl" patch -n "$app_ns" "$nb" --type=merge -p '{"metadata":{"finalizers":null}}' > /dev/null 2>&1
  done
  "$kubectl" delete namespace "$app_ns" "$ns" "$build_ns" --ignore-not-found --wait=false > /dev/null 2>&1
  "$kubectl" delete clusterrole,clusterrolebinding -l app.kubernetes.io/instance="$instance",app.kubernetes.io/name=enbi \
    --ignore-not-found > /dev/null 2>&1
  if $crd_existed; then
    # Someone else's CRD: take back the labels and annotation that the install added.
    "$kubectl" label crd "$crd" app.kubernetes.io/component- app.kubernetes.io/instance- \
      app.kubernetes.io/managed-by- app.kubernetes.io/name- app.kubernetes.io/version- \
      instance.timoni.sh/name- instance.timoni.sh/namespace- > /dev/null 2>&1
    "$kubectl" annotate crd "$crd" action.timoni.sh/prune- > /dev/null 2>&1
  else
    "$kubectl" delete crd "$crd" --ignore-not-found --wait=false > /dev/null 2>&1
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== driver: $("$tm" driver)"
echo "== cluster: $("$kubectl" version -o json | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p' | tail -1)"

# A leftover instance from an interrupted run.
if "$tm" exists "$instance" "$ns" 2>/dev/null; then
  "$tm" delete "$instance" "$ns" > /dev/null 2>&1 || true
fi

echo "== vet and build"
check "vet (timoni mod vet)" "$tm" vet "$instance" "$ns"
check "render (timoni build)" sh -c "'$tm' render '$instance' '$ns' > '$work/build.yaml'"
equals "the build has the expected objects" \
  "ClusterRole ClusterRoleBinding CustomResourceDefinition Deployment Namespace Namespace Role Role RoleBinding RoleBinding Service ServiceAccount ServiceAccount" \
  sh -c "grep '^kind:' '$work/build.yaml' | awk '{print \$2}' | sort | xargs"
equals "Pod Security privileged on the build namespace only" "$build_ns" \
  sh -c "'$tm' render '$instance' '$ns' -o json | python3 -c '
import json, sys
for o in json.load(sys.stdin)[\"items\"]:
    if o[\"metadata\"].get(\"labels\", {}).get(\"pod-security.kubernetes.io/enforce\") == \"privileged\":
        print(o[\"metadata\"][\"name\"])'"

cat > "$work/otel.cue" <<'CUE'
values: {
	telemetry: otlpEndpoint: "http://otel-collector.observability:4317"
	env: OTEL_EXPORTER_OTLP_HEADERS: "x-team=builds"
}
CUE
check "OTel endpoint and extra env reach the operator" sh -c \
  "'$tm' render '$instance' '$ns' -f '$work/otel.cue' > '$work/otel.yaml' &&
   grep -A1 'name: OTEL_EXPORTER_OTLP_ENDPOINT' '$work/otel.yaml' | grep -q 'value: http://otel-collector.observability:4317' &&
   grep -A1 'name: OTEL_EXPORTER_OTLP_HEADERS' '$work/otel.yaml' | grep -q 'value: x-team=builds'"
check "no OTLP endpoint by default" sh -c "! grep -q OTEL_EXPORTER_OTLP_ENDPOINT '$work/build.yaml'"
check "one replica without leader election: Recreate, never two operators" \
  sh -c "grep -A1 '^  strategy:' '$work/build.yaml' | grep -q 'type: Recreate'"

# Namespaced objects cannot be dry-run before their namespace exists: create the two
# Namespaces (as Timoni does first), then dry-run the whole build output on the server.
check "kubectl apply --server-side of the build's Namespaces" sh -c \
  "python3 - '$work/build.yaml' > '$work/ns.yaml' <<'PY'
import sys
docs = open(sys.argv[1]).read().split('\n---\n')
print('\n---\n'.join(d for d in docs if '\nkind: Namespace\n' in '\n' + d + '\n'))
PY
'$kubectl' apply --server-side --field-manager=timoni -f '$work/ns.yaml'"
check "kubectl apply --dry-run=server of the build output" \
  "$kubectl" apply --server-side --field-manager=timoni --force-conflicts --dry-run=server -f "$work/build.yaml"

echo "== bad values are refused"
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
check_fails "negative history limit" 'history.keepSucceeded: invalid value -1 \(out of bound >=0\)' \
  "$tm" render "$instance" "$ns" -f "$work/negative.cue"
check_fails "unknown store mode" 'build.storeMode: (2 errors in empty disjunction|conflicting values)' \
  "$tm" render "$instance" "$ns" -f "$work/store.cue"
check_fails "build namespace = operator namespace" 'build.namespace: invalid value "enbi-system" \(out of bound !="enbi-system"\)' \
  "$tm" render "$instance" "$ns" -f "$work/samens.cue"
check_fails "ENBI_* in extra env" 'env.ENBI_KEEP_FAILED: field not allowed' \
  "$tm" render "$instance" "$ns" -f "$work/env.cue"
check_fails "instance in the default namespace" 'metadata.namespace: invalid value "default" \(out of bound !="default"\)' \
  "$tm" render "$instance" default

echo "== install"
check "install (timoni apply $instance -n $ns)" "$tm" apply "$instance" "$ns"
check "CRD $crd is Established" \
  "$kubectl" wait --for=condition=Established "crd/$crd" --timeout=60s
equals "the CRD is kept by Timoni on delete" "disabled" \
  "$kubectl" get crd "$crd" -o jsonpath='{.metadata.annotations.action\.timoni\.sh/prune}'
check "Deployment $ns/enbi-operator exists" "$kubectl" get deployment -n "$ns" enbi-operator
check "Service $ns/enbi-metrics exists" "$kubectl" get service -n "$ns" enbi-metrics
equals "builder ServiceAccount mounts no token" "false" \
  "$kubectl" get serviceaccount -n "$build_ns" enbi-builder -o jsonpath='{.automountServiceAccountToken}'
equals "build namespace enforces Pod Security privileged" "privileged" \
  "$kubectl" get namespace "$build_ns" -o jsonpath='{.metadata.labels.pod-security\.kubernetes\.io/enforce}'
equals "operator namespace enforces Pod Security restricted" "restricted" \
  "$kubectl" get namespace "$ns" -o jsonpath='{.metadata.labels.pod-security\.kubernetes\.io/enforce}'

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
  "create leases.coordination.k8s.io -n $ns" "update leases.coordination.k8s.io -n $ns"; do
  # shellcheck disable=SC2086
  equals "can $args" yes can $args
done
for args in \
  "get secrets -n $ns" "list secrets -A" "get configmaps -n $ns" "update nixbuilds.enbi.hrzn.ee -n default" \
  "update nixbuilds.enbi.hrzn.ee --subresource=status -n default" \
  "create pods -n $build_ns" "delete pods -A" "patch nodes" \
  "list customresourcedefinitions.apiextensions.k8s.io" \
  "get customresourcedefinitions.apiextensions.k8s.io/other.example.com" \
  "create jobs.batch -n default" "create leases.coordination.k8s.io -n default" \
  "create events -n default" "impersonate serviceaccounts -A"; do
  # shellcheck disable=SC2086
  equals "cannot $args" no can $args
done

echo "== upgrade keeps NixBuilds"
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
cat > "$work/upgrade.cue" <<'CUE'
values: {
	replicas: 2
	history: keepSucceeded: 3
}
CUE
check "upgrade (timoni apply: replicas 2, keepSucceeded 3)" \
  "$tm" apply "$instance" "$ns" -f "$work/upgrade.cue"
equals "Deployment replicas" 2 "$kubectl" get deployment -n "$ns" enbi-operator -o jsonpath='{.spec.replicas}'
env_of() { "$kubectl" get deployment -n "$ns" enbi-operator \
  -o jsonpath="{.spec.template.spec.containers[0].env[?(@.name==\"$1\")].value}"; }
equals "ENBI_KEEP_SUCCEEDED" 3 env_of ENBI_KEEP_SUCCEEDED
equals "ENBI_LEADER_ELECTION with 2 replicas" true env_of ENBI_LEADER_ELECTION
equals "rolling updates with leader election" RollingUpdate \
  "$kubectl" get deployment -n "$ns" enbi-operator -o jsonpath='{.spec.strategy.type}'
equals "the NixBuild survived the upgrade (same uid)" "$uid" \
  "$kubectl" get nixbuild -n "$app_ns" timoni-upgrade -o jsonpath='{.metadata.uid}'

echo "== uninstall keeps the CRD and the NixBuilds"
check "uninstall (timoni delete $instance -n $ns)" "$tm" delete "$instance" "$ns"
check "CRD $crd is still there" "$kubectl" get crd "$crd"
equals "the NixBuild is still there (same uid)" "$uid" \
  "$kubectl" get nixbuild -n "$app_ns" timoni-upgrade -o jsonpath='{.metadata.uid}'
equals "Deployment is gone" "" sh -c "'$kubectl' get deployment -n '$ns' --ignore-not-found -o name"
equals "ClusterRole is gone" "" "$kubectl" get clusterrole enbi-operator --ignore-not-found -o name
check "instance is gone" sh -c "! '$tm' exists '$instance' '$ns'"

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
