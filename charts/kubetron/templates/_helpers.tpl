{{/*
Names and labels shared by every template. Object names are truncated to 63 characters (the
DNS-1123 label limit) and never end in "-".
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubetron.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: fullnameOverride, else "<release>-<name>", else the release name alone when it
already contains the chart name (so `helm install kubetron ./charts/kubetron` gives "kubetron").
*/}}
{{- define "kubetron.fullname" -}}
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

{{/* "<fullname>-<suffix>", truncated so the suffix survives. */}}
{{- define "kubetron.suffixed" -}}
{{- $suffix := .suffix }}
{{- $base := include "kubetron.fullname" .root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{/* Chart name and version, as the helm.sh/chart label. */}}
{{- define "kubetron.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kubetron.labels" -}}
helm.sh/chart: {{ include "kubetron.chart" . }}
{{ include "kubetron.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetron
{{- end }}

{{/* Labels that select the operator's pods; never change them (Deployment selectors are immutable). */}}
{{- define "kubetron.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetron.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "kubetron.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetron.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference: repository[:tag][@digest]; the tag defaults to appVersion. */}}
{{- define "kubetron.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Lease name. */}}
{{- define "kubetron.leaseName" -}}
{{- default (include "kubetron.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Cross-value checks the JSON schema cannot express; each message names the values to change.
Included by the Deployment, so every render runs them.
*/}}
{{- define "kubetron.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "leaderElection.enabled=false with replicaCount=%d: more than one replica needs leader election, or they reconcile the same MegatronJobs at once" (int .Values.replicaCount)) }}
{{- end }}
{{- if and (eq .Values.rbac.scope "namespaces") (not .Values.watchNamespaces) }}
{{- fail "rbac.scope=namespaces needs watchNamespaces: the list of namespaces to grant the operator access to" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor selects the metrics Service" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (kindIs "float64" $pdb.minAvailable) (ge (int $pdb.minAvailable) (int .Values.replicaCount)) }}
{{- fail (printf "podDisruptionBudget.minAvailable=%d with replicaCount=%d lets no operator pod be evicted, so node drains hang; raise replicaCount above it, lower it, or disable the budget" (int $pdb.minAvailable) (int .Values.replicaCount)) }}
{{- end }}
{{- if eq (int .Values.operator.metricsPort) (int .Values.operator.healthPort) }}
{{- fail (printf "operator.metricsPort and operator.healthPort are both %d: the operator serves /metrics and /healthz on separate ports; give them different values" (int .Values.operator.metricsPort)) }}
{{- end }}
{{- end }}

{{/*
Non-empty when the TrainJob backend is on: the operator's default backend, or allowed beside it.
*/}}
{{- define "kubetron.trainJobOn" -}}
{{- if or (eq .Values.backend "TrainJob") .Values.trainJob.enabled }}true{{- end }}
{{- end }}
