{{/*
The operator's least-privilege rules. They must equal kubetron_operator.rbac.RULES and
LEASE_RULES (what `kubetron rbac` prints into manifests/rbac/operator.yaml); tests/chart checks it.
*/}}
{{- define "kubetron.rules" -}}
- apiGroups: ["kubetron.io"]
  resources: ["megatronjobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubetron.io"]
  resources: ["megatronjobs/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "kubetron.leaseRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
{{- end }}
