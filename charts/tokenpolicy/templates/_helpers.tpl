{{/*
Names. Every object the chart creates is named <fullname>-<component>, so
that none can collide with what the operator creates for a TokenPolicy in
the release namespace (those are named after the TokenPolicy itself).
*/}}
{{- define "tokenpolicy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenpolicy.fullname" -}}
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

{{- define "tokenpolicy.operator.fullname" -}}
{{- printf "%s-operator" (include "tokenpolicy.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "tokenpolicy.redis.fullname" -}}
{{- printf "%s-redis" (include "tokenpolicy.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "tokenpolicy.serviceAccountName" -}}
{{- default (include "tokenpolicy.operator.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/*
Labels. Each component has its own app.kubernetes.io/name (as cert-manager
does), so that no selector of the chart matches the token service pods the
operator creates (app.kubernetes.io/name: tokenpolicy, component:
token-service), and none of theirs matches the chart's pods.
*/}}
{{- /* With a component's selector labels (name, instance, component). */}}
{{- define "tokenpolicy.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "tokenpolicy.name" . }}
{{- end }}

{{- define "tokenpolicy.crds.labels" -}}
app.kubernetes.io/name: {{ include "tokenpolicy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: crds
{{ include "tokenpolicy.commonLabels" . }}
{{- end }}

{{- define "tokenpolicy.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenpolicy.name" . | trunc 54 | trimSuffix "-" }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tokenpolicy.operator.labels" -}}
{{ include "tokenpolicy.operator.selectorLabels" . }}
{{ include "tokenpolicy.commonLabels" . }}
{{- end }}

{{- define "tokenpolicy.redis.selectorLabels" -}}
app.kubernetes.io/name: redis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: session-store
{{- end }}

{{- define "tokenpolicy.redis.labels" -}}
{{ include "tokenpolicy.redis.selectorLabels" . }}
{{ include "tokenpolicy.commonLabels" . }}
{{- end }}

{{/*
An image reference from {registry, repository, tag, digest}; the tag
defaults to the chart's appVersion, a digest pins it.
*/}}
{{- define "tokenpolicy.imageRef" -}}
{{- $image := .image }}
{{- $ref := $image.repository }}
{{- if $image.registry }}
{{- $ref = printf "%s/%s" $image.registry $image.repository }}
{{- end }}
{{- $tag := default .default $image.tag }}
{{- if $tag }}
{{- $ref = printf "%s:%s" $ref $tag }}
{{- end }}
{{- if $image.digest }}
{{- $ref = printf "%s@%s" $ref $image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{- define "tokenpolicy.operator.image" -}}
{{- include "tokenpolicy.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{- define "tokenpolicy.tokenService.image" -}}
{{- default (include "tokenpolicy.operator.image" .) .Values.tokenServiceImage }}
{{- end }}

{{/* The repositories spec.image may name; default: the operator's own. */}}
{{- define "tokenpolicy.tokenService.allowedImages" -}}
{{- if .Values.tokenService.allowedImages }}
{{- join "," .Values.tokenService.allowedImages }}
{{- else if .Values.image.registry }}
{{- printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- else }}
{{- .Values.image.repository }}
{{- end }}
{{- end }}

{{- define "tokenpolicy.redis.image" -}}
{{- include "tokenpolicy.imageRef" (dict "image" .Values.redis.image "default" "") }}
{{- end }}

{{/* The trial Redis' Secret: the password, the URL and redis.conf. */}}
{{- define "tokenpolicy.redis.secretName" -}}
{{- include "tokenpolicy.redis.fullname" . }}
{{- end }}
