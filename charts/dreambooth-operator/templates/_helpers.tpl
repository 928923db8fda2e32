{{/* Names, labels and image references shared by the templates. */}}

{{- define "dreambooth-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "dreambooth-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dreambooth-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selects the operator pod; the operator's pods never match the trainer PodMonitor
     (app.kubernetes.io/component: operator, not trainer). */}}
{{- define "dreambooth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dreambooth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "dreambooth-operator.labels" -}}
helm.sh/chart: {{ include "dreambooth-operator.chart" . }}
{{ include "dreambooth-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dreambooth
{{- end }}

{{- define "dreambooth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dreambooth-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dreambooth-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "dreambooth-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "dreambooth-operator.imageRef" -}}
{{- $image := index . 0 -}}
{{- $appVersion := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag) -}}
{{- end -}}
{{- end }}

{{/* Labels of every trainer pod (dreambooth/operator/naming.py: labels()). */}}
{{- define "dreambooth-operator.trainerSelector" -}}
app.kubernetes.io/name: dreambooth
app.kubernetes.io/component: trainer
{{- end }}

{{/* Namespaces that get trainer NetworkPolicies. */}}
{{- define "dreambooth-operator.networkPolicyNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces | default .Values.watchNamespaces -}}
{{- if not $namespaces -}}
{{- fail "networkPolicy.enabled needs the trainer namespaces: set networkPolicy.namespaces (the operator watches every namespace, watchNamespaces is empty)" -}}
{{- end -}}
{{- toJson $namespaces -}}
{{- end }}

{{/* Checks of values that the schema cannot express. */}}
{{- define "dreambooth-operator.validate" -}}
{{- if eq (int .Values.metrics.port) (int .Values.operator.healthPort) -}}
{{- fail (printf "metrics.port and operator.healthPort are both %v: the operator serves them separately; use two ports" .Values.metrics.port) -}}
{{- end -}}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.service.enabled) -}}
{{- fail "serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor selects that Service" -}}
{{- end -}}
{{- end }}

{{/* The gallery's pods and objects: component gallery (never selected as the operator). */}}
{{- define "dreambooth-operator.gallerySelectorLabels" -}}
app.kubernetes.io/name: {{ include "dreambooth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gallery
{{- end }}

{{- define "dreambooth-operator.galleryLabels" -}}
helm.sh/chart: {{ include "dreambooth-operator.chart" . }}
{{ include "dreambooth-operator.gallerySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dreambooth
{{- end }}
