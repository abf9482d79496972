{{/* Names ------------------------------------------------------------------------- */}}

{{- define "fal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* RELEASE-fal-serverless, or RELEASE when it already says fal-serverless. Kept short
     enough that "-operator-metrics" still fits a 63-character Service name. */}}
{{- define "fal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fal.operatorName" -}}{{ include "fal.fullname" . }}-operator{{- end -}}
{{- define "fal.gatewayName" -}}{{ include "fal.fullname" . }}-gateway{{- end -}}
{{- define "fal.redisName" -}}{{ include "fal.fullname" . }}-redis{{- end -}}
{{- define "fal.catalogName" -}}{{ include "fal.fullname" . }}-catalog{{- end -}}
{{- define "fal.leaseName" -}}{{ include "fal.fullname" . }}-operator{{- end -}}

{{/* Labels ------------------------------------------------------------------------ */}}

{{- define "fal.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: fal-serverless
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fal.labels" -}}
{{ include "fal.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Pod selector of one component: {{ include "fal.selector" (list . "operator") }} */}}
{{- define "fal.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "fal.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "fal.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "fal.commonLabels" $root }}
{{ include "fal.selector" . }}
{{- end -}}

{{/* Images ------------------------------------------------------------------------ */}}

{{- define "fal.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "fal.gatewayImage" -}}
{{- $repo := default .Values.operator.image.repository .Values.gateway.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.operator.image.tag) .Values.gateway.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "fal.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) -}}
{{- end -}}

{{- define "fal.runnerImage" -}}
{{- printf "%s:%s" .Values.runner.image.repository (default .Chart.AppVersion .Values.runner.image.tag) -}}
{{- end -}}

{{/* Store -------------------------------------------------------------------------- */}}

{{/* Refuses a configuration without exactly one store. Included by every template that
     needs the store, so the message comes first whatever is rendered. */}}
{{- define "fal.checkStore" -}}
{{- $sources := 0 -}}
{{- if .Values.redis.enabled }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .Values.store.url }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .Values.store.existingSecret }}{{ $sources = add1 $sources }}{{ end -}}
{{- if eq $sources 0 -}}
{{- fail "store: no job store configured. With redis.enabled=false set store.url (redis://HOST:PORT/DB) or store.existingSecret (a Secret holding that URL under store.existingSecretKey)" -}}
{{- end -}}
{{- if gt $sources 1 -}}
{{- fail "store: choose one job store: the bundled Redis (redis.enabled=true), store.url or store.existingSecret; set redis.enabled=false to use store.url or store.existingSecret" -}}
{{- end -}}
{{- if and .Values.store.url (not (regexMatch "^rediss?(\\+cluster|\\+sentinel)?://" .Values.store.url)) -}}
{{- fail (printf "store.url: %q is not a Redis URL (redis://[:PASSWORD@]HOST:PORT/DB, redis+cluster://H:P[,H:P…], redis+sentinel://S:P[,S:P…]/MASTER[/DB], or rediss… for TLS)" .Values.store.url) -}}
{{- end -}}
{{- if and .Values.redis.enabled (gt (int .Values.store.replicas) 0) -}}
{{- fail "store.replicas: the bundled Redis has no replicas to confirm writes, so every submit would get 503; use store.replicas with a replicated Redis (store.url or store.existingSecret)" -}}
{{- end -}}
{{- end -}}

{{/* The Secret the store URL is read from, and its key. */}}
{{- define "fal.storeSecretName" -}}
{{- if .Values.store.existingSecret -}}{{ .Values.store.existingSecret }}{{- else -}}{{ include "fal.fullname" . }}-store{{- end -}}
{{- end -}}

{{- define "fal.storeSecretKey" -}}
{{- if .Values.store.existingSecret -}}{{ .Values.store.existingSecretKey }}{{- else -}}url{{- end -}}
{{- end -}}

{{/* FAL_STORE_URL from the Secret: never a plaintext env value. */}}
{{- define "fal.storeEnv" -}}
- name: FAL_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "fal.storeSecretName" . }}
      key: {{ include "fal.storeSecretKey" . }}
{{- if gt (int .Values.store.replicas) 0 }}
- name: FAL_STORE_REPLICAS
  value: {{ .Values.store.replicas | quote }}
{{- end }}
{{- end -}}

{{/* Signing key -------------------------------------------------------------------- */}}

{{- define "fal.signingSecretName" -}}
{{- if .Values.signing.existingSecret -}}{{ .Values.signing.existingSecret }}{{- else -}}{{ include "fal.fullname" . }}-signing-key{{- end -}}
{{- end -}}

{{/* Namespaces that get copies of chart-owned Secrets: the release namespace first. */}}
{{- define "fal.secretNamespaces" -}}
{{- $out := list .Release.Namespace -}}
{{- range .Values.functionNamespaces }}{{ if not (has . $out) }}{{ $out = append $out . }}{{ end }}{{ end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Security ------------------------------------------------------------------------ */}}

{{/* The restricted Pod Security Standard, for every container of the chart. */}}
{{- define "fal.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fal.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}
