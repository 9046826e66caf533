{{/*
Names, labels, the role's parts, the TOML file and the memory request: everything the templates
share. The TOML is written here (not with toToml) because Helm reads values through JSON, so
every number arrives as a float, and tailnetd refuses `32.0` where it takes an integer.
*/}}

{{- define "tailnetd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tailnetd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tailnetd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tailnetd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tailnetd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tailnetd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .Values.role }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tailnetd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tailnetd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "true" when the role runs the relay (and STUN), "" otherwise. */}}
{{- define "tailnetd.runsRelay" -}}
{{- if has .Values.role (list "serve" "derp") }}true{{ end -}}
{{- end -}}

{{/* "true" when the role runs the coordinator, "" otherwise. */}}
{{- define "tailnetd.runsCoordinator" -}}
{{- if has .Values.role (list "serve" "coordinator") }}true{{ end -}}
{{- end -}}

{{- define "tailnetd.stunEnabled" -}}
{{- if and (include "tailnetd.runsRelay" .) .Values.stun.enabled }}true{{ end -}}
{{- end -}}

{{/* Refuses values that cannot work, before anything is rendered from them. */}}
{{- define "tailnetd.validate" -}}
{{- if not (has .Values.role (list "serve" "coordinator" "derp")) -}}
{{- fail (printf "role: %q is not one of serve, coordinator, derp (dev is for a laptop, not a cluster)" .Values.role) -}}
{{- end -}}
{{- if not (has .Values.kind (list "Deployment" "DaemonSet")) -}}
{{- fail (printf "kind: %q is neither Deployment nor DaemonSet" .Values.kind) -}}
{{- end -}}
{{- if and .Values.postgres.existingSecret (not (include "tailnetd.runsCoordinator" .)) -}}
{{- fail "postgres.existingSecret: only the serve and coordinator roles use PostgreSQL" -}}
{{- end -}}
{{- if and (include "tailnetd.runsCoordinator" .) (eq .Values.kind "Deployment") (gt (int .Values.replicaCount) 1) (not .Values.postgres.existingSecret) -}}
{{- fail "replicaCount: more than one serve/coordinator replica needs postgres.existingSecret (replicas share one peer graph only through PostgreSQL)" -}}
{{- end -}}
{{- if and (include "tailnetd.runsCoordinator" .) (eq .Values.kind "DaemonSet") (not .Values.postgres.existingSecret) -}}
{{- fail "kind: a DaemonSet of serve/coordinator pods needs postgres.existingSecret (replicas share one peer graph only through PostgreSQL)" -}}
{{- end -}}
{{- if and .Values.mesh.pskSecret (ne .Values.role "derp") -}}
{{- fail "mesh.pskSecret: the relay mesh is configured on derp relays" -}}
{{- end -}}
{{- range $k := list "http_addr" "https_addr" "tls_cert" "tls_key" "stun_addr" "key_file" "mesh_psk_file" "metrics_addr" -}}
{{- if hasKey ($.Values.config | default dict) $k -}}
{{- fail (printf "config.%s is set by the chart (ports, tls, stun, mesh); remove it from config" $k) -}}
{{- end -}}
{{- end -}}
{{- if and (hasKey ($.Values.config | default dict) "coordinator") (hasKey (.Values.config.coordinator | default dict) "postgres_url") -}}
{{- fail "config.coordinator.postgres_url: put the URL in a Secret and name it in postgres.existingSecret" -}}
{{- end -}}
{{- end -}}

{{/* The mount points the chart owns. */}}
{{- define "tailnetd.configPath" -}}/etc/tailnetd/tailnetd.toml{{- end -}}
{{- define "tailnetd.statePath" -}}/var/lib/tailnetd{{- end -}}
{{- define "tailnetd.tlsPath" -}}/etc/tailnetd/tls{{- end -}}
{{- define "tailnetd.meshPath" -}}/etc/tailnetd/mesh{{- end -}}

{{/* The settings as a dict (JSON): `config` plus what the chart owns. */}}
{{- define "tailnetd.settings" -}}
{{- $c := deepCopy (.Values.config | default dict) -}}
{{- $_ := set $c "http_addr" (printf "0.0.0.0:%d" (int .Values.ports.http)) -}}
{{- $_ := set $c "metrics_addr" (printf "0.0.0.0:%d" (int .Values.ports.metrics)) -}}
{{- if .Values.tls.secretName -}}
{{- $_ := set $c "https_addr" (printf "0.0.0.0:%d" (int .Values.ports.https)) -}}
{{- $_ := set $c "tls_cert" (printf "%s/tls.crt" (include "tailnetd.tlsPath" .)) -}}
{{- $_ := set $c "tls_key" (printf "%s/tls.key" (include "tailnetd.tlsPath" .)) -}}
{{- end -}}
{{- if include "tailnetd.runsRelay" . -}}
{{- $_ := set $c "key_file" (printf "%s/derp.key" (include "tailnetd.statePath" .)) -}}
{{- if .Values.stun.enabled -}}
{{- $_ := set $c "stun_addr" (printf "0.0.0.0:%d" (int .Values.ports.stun)) -}}
{{- else -}}
{{- $_ := set $c "stun_addr" "" -}}
{{- end -}}
{{- end -}}
{{- if .Values.mesh.pskSecret -}}
{{- $_ := set $c "mesh_psk_file" (printf "%s/%s" (include "tailnetd.meshPath" .) .Values.mesh.key) -}}
{{- end -}}
{{- toJson $c -}}
{{- end -}}

{{/* A TOML key: bare when it may be, else quoted. */}}
{{- define "tailnetd.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{/*
A value as inline TOML: tables as { k = v }, lists as [ ... ], strings as JSON strings (a valid
TOML basic string), whole numbers as integers.
*/}}
{{- define "tailnetd.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "map" $v -}}
{{- $parts := list -}}
{{- range $k, $x := $v -}}
{{- if not (kindIs "invalid" $x) -}}
{{- $parts = append $parts (printf "%s = %s" (include "tailnetd.tomlKey" $k) (include "tailnetd.tomlValue" $x)) -}}
{{- end -}}
{{- end -}}
{{- if $parts -}}{ {{ join ", " $parts }} }{{- else -}}{}{{- end -}}
{{- else if kindIs "slice" $v -}}
{{- $parts := list -}}
{{- range $x := $v -}}
{{- $parts = append $parts (include "tailnetd.tomlValue" $x) -}}
{{- end -}}
[{{ join ", " $parts }}]
{{- else if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- ternary "true" "false" $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq (float64 (int64 $v)) (float64 $v) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else if kindIs "invalid" $v -}}
{{- fail "a null value cannot be written as TOML" -}}
{{- else -}}
{{- $v -}}
{{- end -}}
{{- end -}}

{{/* The TOML file: top-level keys first, then one [section] per table. Nulls are left out. */}}
{{- define "tailnetd.toml" -}}
{{- $c := include "tailnetd.settings" . | fromJson -}}
# tailnetd {{ .Values.role }}: rendered by the tailnetd Helm chart from .Values.config.
# `tailnetd {{ .Values.role }} --config {{ include "tailnetd.configPath" . }} --check` shows the effective settings.
{{- range $k, $v := $c }}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) }}
{{ include "tailnetd.tomlKey" $k }} = {{ include "tailnetd.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := $c }}
{{- if kindIs "map" $v }}

[{{ include "tailnetd.tomlKey" $k }}]
{{- range $k2, $v2 := $v }}
{{- if not (kindIs "invalid" $v2) }}
{{ include "tailnetd.tomlKey" $k2 }} = {{ include "tailnetd.tomlValue" $v2 }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Memory request in MiB from the measured cost per connection (values.yaml, sizing). */}}
{{- define "tailnetd.memoryRequestMi" -}}
{{- $s := .Values.sizing -}}
{{- $m := $s.measured -}}
{{- $bytes := int64 $m.baseBytes -}}
{{- if include "tailnetd.runsRelay" . -}}
{{- $bytes = add $bytes (mul (int64 $s.relayConnections) (int64 $m.relayBytesPerConnection)) -}}
{{- end -}}
{{- if include "tailnetd.runsCoordinator" . -}}
{{- $bytes = add $bytes (mul (int64 $s.coordinatorPeers) (int64 $m.coordinatorBytesPerPeer)) -}}
{{- end -}}
{{- $bytes = div (mul $bytes (add 100 (int64 $s.headroomPercent))) 100 -}}
{{- div (add $bytes 1048575) 1048576 -}}
{{- end -}}

{{- define "tailnetd.resources" -}}
{{- if .Values.resources -}}
{{- toYaml .Values.resources -}}
{{- else -}}
{{- $mi := int64 (include "tailnetd.memoryRequestMi" .) -}}
requests:
  cpu: {{ .Values.sizing.cpu | quote }}
  memory: {{ printf "%dMi" $mi | quote }}
{{- if .Values.sizing.memoryLimitFactor }}
limits:
  memory: {{ printf "%dMi" (mul $mi (int64 .Values.sizing.memoryLimitFactor)) | quote }}
{{- end }}
{{- end -}}
{{- end -}}
