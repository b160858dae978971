{{/*
Helpers of the idlm chart: names, labels, the Serve config (serveConfigV2) and the shared Ray
container pieces.
*/}}

{{- define "idlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "idlm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "idlm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "idlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "idlm.labels" -}}
helm.sh/chart: {{ include "idlm.chart" . }}
{{ include "idlm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: idlm-serve
{{- end -}}

{{- define "idlm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* True ("true") when the Ray autoscaler should run. */}}
{{- define "idlm.autoscaling" -}}
{{- if kindIs "bool" .Values.rayService.enableInTreeAutoscaling -}}
{{- .Values.rayService.enableInTreeAutoscaling -}}
{{- else -}}
{{- hasKey (default (dict) .Values.app.replica) "autoscaling_config" -}}
{{- end -}}
{{- end -}}

{{/*
The Serve config: one application whose args are .Values.app, rendered as YAML text.
*/}}
{{- define "idlm.serveConfig" -}}
{{- if and .Values.apiKey.existingSecret .Values.app.api_key -}}
{{- fail "set either apiKey.existingSecret or app.api_key, not both" -}}
{{- end -}}
{{- $app := dict "name" .Values.serve.applicationName "route_prefix" .Values.serve.routePrefix "import_path" .Values.serve.importPath "args" .Values.app -}}
{{- with .Values.serve.runtimeEnv -}}
{{- $_ := set $app "runtime_env" . -}}
{{- end -}}
{{- $http := dict "host" "0.0.0.0" "port" (int .Values.serve.port) -}}
{{- $cfg := dict "proxy_location" .Values.serve.proxyLocation "http_options" $http "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* rayStartParams with string values (the CRD requires strings); args: params, metricsPort. */}}
{{- define "idlm.rayStartParams" -}}
{{- $p := dict "metrics-export-port" (toString .metricsPort) -}}
{{- range $k, $v := .params -}}
{{- $_ := set $p $k (toString $v) -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/* Env shared by every Ray container; arg: dict root, extra. */}}
{{- define "idlm.env" -}}
{{- $root := .root -}}
{{- $env := concat (default (list) $root.Values.common.env) (default (list) .extra) -}}
{{- if $root.Values.apiKey.existingSecret -}}
{{- $ref := dict "secretKeyRef" (dict "name" $root.Values.apiKey.existingSecret "key" $root.Values.apiKey.secretKey) -}}
{{- $env = append $env (dict "name" $root.Values.apiKey.envName "valueFrom" $ref) -}}
{{- end -}}
{{- with $env }}
env:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.common.envFrom }}
envFrom:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
