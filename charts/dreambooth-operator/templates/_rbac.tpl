{{/*
Generated from dreambooth/operator/rbac.py by `make crds`. Do not edit by hand.
The operator's permissions; tests/chart/test_rbac.py checks rbac.py against the API
calls in the operator's code and renders the chart. These rules do not depend on values.
*/}}

{{/* rbac.OPERATOR: in each watched namespace (or cluster-wide). */}}
{{- define "dreambooth-operator.rules.operator" -}}
- apiGroups: [""]
  resources: [configmaps, events, services]
  verbs: [create]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, create, patch, delete]
- apiGroups: [dreambooth.io]
  resources: [dreamboothjobs]
  verbs: [create, patch]
- apiGroups: [dreambooth.io]
  resources: [dreamboothsweeps]
  verbs: [list, watch]
- apiGroups: [dreambooth.io]
  resources: [dreamboothjobs]
  verbs: [list, watch, delete]
- apiGroups: [dreambooth.io]
  resources: [dreamboothjobs/status, dreamboothsweeps/status]
  verbs: [patch]
- apiGroups: [dreambooth.io]
  resources: [dreamboothjobs/finalizers, dreamboothsweeps/finalizers]
  verbs: [update]
{{- end }}

{{/* rbac.KOPF_CLUSTER: kopf follows CRD changes (cluster-scoped, read-only). */}}
{{- define "dreambooth-operator.rules.kopfCluster" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}

{{/* rbac.KOPF_NAMESPACES: kopf follows the watched namespaces (only with a list of them). */}}
{{- define "dreambooth-operator.rules.kopfNamespaces" -}}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}

{{/* rbac.GALLERY: the gallery (gallery.enabled) reads DreamBoothJobs, nothing else. */}}
{{- define "dreambooth-operator.rules.gallery" -}}
- apiGroups: [dreambooth.io]
  resources: [dreamboothjobs]
  verbs: [get, list, watch]
{{- end }}
