{{/* The chart name, or nameOverride. */}}
{{- define "embedq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or fullnameOverride; the prefix of every resource name. */}}
{{- define "embedq.fullname" -}}
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

{{- define "embedq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "embedq.labels" -}}
helm.sh/chart: {{ include "embedq.chart" . }}
{{ include "embedq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select this release's pods; a component label narrows them further. */}}
{{- define "embedq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "embedq.gateway.fullname" -}}
{{- printf "%s-gateway" (include "embedq.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Worker objects are named after their entry: call with (dict "root" $ "worker" $worker). */}}
{{- define "embedq.worker.fullname" -}}
{{- printf "%s-worker-%s" (include "embedq.fullname" .root) .worker.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedq.gateway.url" -}}
{{- printf "http://%s:%v" (include "embedq.gateway.fullname" .) .Values.gateway.service.port }}
{{- end }}

{{- define "embedq.workerToken.secretName" -}}
{{- default (printf "%s-worker-token" (include "embedq.fullname" .)) .Values.workerToken.existingSecret }}
{{- end }}

{{- define "embedq.apiKeys.secretName" -}}
{{- default (printf "%s-api-keys" (include "embedq.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/* A worker entry over workerDefaults, as YAML (use with fromYaml). Two levels deep, with set,
     not sprig's merge: that would take an entry's false or 0 for "unset" and keep the default. */}}
{{- define "embedq.worker.values" -}}
{{- $merged := deepCopy .defaults }}
{{- range $key, $value := .entry }}
{{- $default := get $merged $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $default) }}
{{- range $k, $v := $value }}
{{- $_ := set $default $k $v }}
{{- end }}
{{- else }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- end }}
{{- toYaml $merged }}
{{- end }}

{{/* GPUs one worker pod needs: tensor x pipeline parallel size. */}}
{{- define "embedq.worker.gpus" -}}
{{- mul (int .generator.tensorParallelSize) (int .generator.pipelineParallelSize) }}
{{- end }}

{{/* A worker's config.toml: the operators' format, rendered from its values entry. */}}
{{- define "embedq.worker.config" -}}
{{- $w := .worker -}}
{{- $g := $w.generator -}}
{{- $model := default $w.name $w.model -}}
{{- if $w.configToml }}
{{- $w.configToml }}
{{- else -}}
edition = 1

[generator]
type = "vllm"
model_path = {{ required (printf "workers[%s].generator.modelPath is required (or give configToml)" $w.name) $g.modelPath | quote }}
{{- if $g.maxModelLen }}
max_model_len = {{ int $g.maxModelLen }}
{{- end }}
max_num_seqs = {{ int $g.maxNumSeqs }}
pipeline_parallel_size = {{ int $g.pipelineParallelSize }}
tensor_parallel_size = {{ int $g.tensorParallelSize }}
task = "embed"
dtype = {{ $g.dtype | quote }}
enforce_eager = {{ $g.enforceEager }}
gpu_memory_utilization = {{ $g.gpuMemoryUtilization }}

[queue]
url = {{ include "embedq.gateway.url" .root | quote }}
token_file = "/var/run/secrets/embedq/{{ .root.Values.workerToken.secretKey }}"
checkpoint_name = {{ default $w.name $w.checkpointName | quote }}
version = 1
tags = [{{ range $i, $t := $w.tags }}{{ if $i }}, {{ end }}{{ $t | quote }}{{ end }}]
http_request_retries = 7
service_name = {{ $w.name | quote }}
service_role = "Worker"
drain_timeout_s = {{ max 5 (sub (int $w.terminationGracePeriodSeconds) 10) }}

[queue.models.{{ $model | quote }}]
maximum_completion_tokens = 0
description = {{ $w.description | quote }}
matryoshka_dimensions = [{{ range $i, $d := $w.matryoshkaDimensions }}{{ if $i }}, {{ end }}{{ int $d }}{{ end }}]
truncate = {{ $w.truncate }}

[queue.models.{{ $model | quote }}.embedding_task]
supported = true

[monitoring]
metrics_port = {{ int $w.metricsPort }}
tcp_probes = []
{{- end }}
{{- end }}
