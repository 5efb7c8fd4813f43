{{/* The release's base name: the release name when it says hallmark
already, else RELEASE-hallmark; at most 40 characters so that every object
name made from it stays within Kubernetes' 63. */}}
{{- define "hallmark.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object, beside its name and instance (a selector's
or "hallmark.instance"). */}}
{{- define "hallmark.labels" -}}
app.kubernetes.io/part-of: hallmark
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What the coordinator's Deployment, Service and disruption budget
select. */}}
{{- define "hallmark.coordinatorSelector" -}}
app.kubernetes.io/name: hallmark-coordinator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A worker pool's settings: workerDefaults, overridden by the pool's
own keys. Call with (list $ $pool); yields YAML to fromYaml. */}}
{{- define "hallmark.pool" -}}
{{- $root := index . 0 -}}
{{- $pool := index . 1 -}}
{{- toYaml (mergeOverwrite (deepCopy $root.Values.workerDefaults) (deepCopy $pool)) -}}
{{- end -}}

{{/* What a worker pool's Deployment selects. Call with (list $ $name). */}}
{{- define "hallmark.workerSelector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: hallmark-worker
app.kubernetes.io/instance: {{ $root.Release.Name }}
hallmark/pool: {{ index . 1 }}
{{- end -}}

{{/* The release's label, for objects no selector names. */}}
{{- define "hallmark.instance" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
