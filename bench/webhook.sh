# shellcheck shell=bash
# Sourced by the bench scripts: a MutatingWebhookConfiguration like the Timoni module's, for
# Pods created in one namespace, served by an operator on this machine (127.0.0.1:PORT).
# apply_webhook NAME NAMESPACE PORT: applies it and waits until the operator has patched in its
# CA bundle and loaded its certificate. Needs $KUBECTL.
apply_webhook() {
  "$KUBECTL" apply -f - >/dev/null <<YAML
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: $1}
webhooks:
- name: pods.enbi.hrzn.ee
  admissionReviewVersions: [v1]
  clientConfig: {url: "https://127.0.0.1:$3/mutate-pods"}
  rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods], scope: Namespaced}]
  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: $2}}
  matchConditions: [{name: asks-for-a-build, expression: "has(object.metadata.annotations) && 'enbi.hrzn.ee/nixbuild-imageTag' in object.metadata.annotations"}]
  failurePolicy: Ignore
  sideEffects: None
  timeoutSeconds: 5
YAML
  until [[ -n "$("$KUBECTL" get mutatingwebhookconfiguration "$1" -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]]; do sleep 0.2; done
  sleep 1 # the operator loads its certificate right after patching the bundle
}
