{{/* Names: <release>-muon-server unless the release name already contains it. */}}
{{- define "muon-server.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "muon-server.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "muon-server.labels" -}}
{{ include "muon-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "muon-server.adminEnabled" -}}
{{- if or .Values.adminToken.existingSecret .Values.adminToken.value -}}true{{- end -}}
{{- end -}}

{{- define "muon-server.adminSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "muon-server.fullname" .)) -}}
{{- end -}}

{{- define "muon-server.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "muon-server.fullname" .)) -}}
{{- end -}}

{{/*
The server's flagfile, one --name=value a line. Values from other sections
(ports, persistence, tls, adminToken) come first; server.extraFlags last, so
an extra flag given twice wins (absl keeps the last value).
*/}}
{{- define "muon-server.flags" -}}
{{- $s := .Values.server -}}
--listen=0.0.0.0:{{ .Values.ports.grpc }}
--metrics_listen=0.0.0.0:{{ .Values.ports.metrics }}
--engine={{ $s.engine }}
--memory_budget_bytes={{ $s.memoryBudgetBytes | int64 }}
--max_sessions={{ $s.maxSessions | int64 }}
--max_params_per_session={{ $s.maxParamsPerSession | int64 }}
--max_bytes_per_session={{ $s.maxBytesPerSession | int64 }}
--max_message_bytes={{ $s.maxMessageBytes | int64 }}
--max_concurrent_streams={{ $s.maxConcurrentStreams | int64 }}
--drain_timeout_seconds={{ $s.drainTimeoutSeconds }}
--checkpoint_dir={{ .Values.persistence.mountPath }}
{{- with $s.durability }}
--durability={{ . }}
{{- end }}
{{- if $s.checkpointEvery }}
--checkpoint_every_steps={{ $s.checkpointEvery | int64 }}
{{- end }}
{{- if .Values.tls.enabled }}
--tls_cert=/etc/muon/tls/tls.crt
--tls_key=/etc/muon/tls/tls.key
{{- if .Values.tls.mutualTls }}
--tls_client_ca=/etc/muon/tls/ca.crt
{{- end }}
{{- end }}
{{- if include "muon-server.adminEnabled" . }}
--admin_token_file=/etc/muon/admin/admin-token
{{- end }}
{{- range $flag, $value := $s.extraFlags }}
--{{ $flag }}={{ $value }}
{{- end }}
{{- end -}}

{{/* Checks that fail the render with a message a person can act on. */}}
{{- define "muon-server.validate" -}}
{{- if not (lt (float64 .Values.server.drainTimeoutSeconds) (float64 .Values.terminationGracePeriodSeconds)) -}}
{{- fail (printf "server.drainTimeoutSeconds (%v) must be below terminationGracePeriodSeconds (%v), or Kubernetes kills the server mid-drain" .Values.server.drainTimeoutSeconds .Values.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- if and (eq (toString .Values.server.durability) "strict") (not .Values.persistence.enabled) -}}
{{- fail "server.durability=strict needs persistence.enabled: an emptyDir does not outlive the pod" -}}
{{- end -}}
{{- if not (has .Values.podAntiAffinity (list "soft" "hard" "")) -}}
{{- fail (printf "podAntiAffinity must be soft, hard or \"\", not %q" (toString .Values.podAntiAffinity)) -}}
{{- end -}}
{{- if not (has .Values.server.engine (list "auto" "cpu" "cuda")) -}}
{{- fail (printf "server.engine must be auto, cpu or cuda, not %q" (toString .Values.server.engine)) -}}
{{- end -}}
{{- end -}}
