{{/* Names, labels and the pieces both workloads share. */}}

{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Truncated to 48 so that "<fullname>-shard-<ordinal>" and the Service names stay DNS labels. */}}
{{- define "loraplex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.router.fullname" -}}{{ include "loraplex.fullname" . }}-router{{- end -}}
{{- define "loraplex.shard.fullname" -}}{{ include "loraplex.fullname" . }}-shard{{- end -}}

{{- define "loraplex.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loraplex.router.selectorLabels" -}}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "loraplex.shard.selectorLabels" -}}
{{ include "loraplex.selectorLabels" . }}
app.kubernetes.io/component: shard
{{- end -}}

{{- define "loraplex.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* grace period: preStop sleep + drain + slack, or the user's value when it leaves room for both. */}}
{{- define "loraplex.gracePeriod" -}}
{{- $min := add .preStopSleepSeconds .drainTimeoutSeconds -}}
{{- if kindIs "invalid" .terminationGracePeriodSeconds -}}
{{- add $min 10 -}}
{{- else if le (int .terminationGracePeriodSeconds) (int $min) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + drainTimeoutSeconds (%v)" .terminationGracePeriodSeconds $min) -}}
{{- else -}}
{{- .terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Consul flags shared by both binaries. */}}
{{- define "loraplex.consulArgs" -}}
{{- if .Values.consul.enabled }}
- -consul={{ required "consul.address is required when consul.enabled" .Values.consul.address }}
{{- if .Values.consul.datacenter }}
- -consul-datacenter={{ .Values.consul.datacenter }}
{{- end }}
{{- if .Values.consul.tls.enabled }}
- -consul-scheme=https
- -consul-ca-file=/etc/loraplex/consul-tls/{{ .Values.consul.tls.caKey }}
{{- if .Values.consul.tls.clientCert }}
- -consul-cert-file=/etc/loraplex/consul-tls/{{ .Values.consul.tls.certKey }}
- -consul-key-file=/etc/loraplex/consul-tls/{{ .Values.consul.tls.keyKey }}
{{- end }}
{{- end }}
{{- if .Values.consul.acl.existingSecret }}
- -consul-token-file=/etc/loraplex/consul-token/{{ .Values.consul.acl.key }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Flags both binaries take: metrics. */}}
{{- define "loraplex.commonArgs" -}}
{{- if .Values.metrics.enabled }}
- -metrics-listen=:{{ .Values.metrics.port }}
{{- end }}
{{- end -}}

{{- define "loraplex.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and .Values.consul.enabled .Values.consul.tls.enabled }}
- name: consul-tls
  mountPath: /etc/loraplex/consul-tls
  readOnly: true
{{- end }}
{{- if and .Values.consul.enabled .Values.consul.acl.existingSecret }}
- name: consul-token
  mountPath: /etc/loraplex/consul-token
  readOnly: true
{{- end }}
{{- end -}}

{{- define "loraplex.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if and .Values.consul.enabled .Values.consul.tls.enabled }}
- name: consul-tls
  secret:
    secretName: {{ required "consul.tls.existingSecret is required when consul.tls.enabled" .Values.consul.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if and .Values.consul.enabled .Values.consul.acl.existingSecret }}
- name: consul-token
  secret:
    secretName: {{ .Values.consul.acl.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* The shard's admin RPCs (adapter load/unload/pin) and their token: the router has none. */}}
{{- define "loraplex.adminTokenArgs" -}}
{{- if .Values.adminToken.existingSecret }}
- -admin-token-file=/etc/loraplex/admin-token/{{ .Values.adminToken.key }}
{{- end }}
{{- end -}}

{{- define "loraplex.adminTokenVolumeMounts" -}}
{{- if .Values.adminToken.existingSecret }}
- name: admin-token
  mountPath: /etc/loraplex/admin-token
  readOnly: true
{{- end }}
{{- end -}}

{{- define "loraplex.adminTokenVolumes" -}}
{{- if .Values.adminToken.existingSecret }}
- name: admin-token
  secret:
    secretName: {{ .Values.adminToken.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "loraplex.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
- name: POD_IP
  valueFrom:
    fieldRef: {fieldPath: status.podIP}
- name: HOST_IP
  valueFrom:
    fieldRef: {fieldPath: status.hostIP}
{{- end -}}

{{/*
Probes: the kubelet's native gRPC probe against grpc.health.v1 (the shard answers NOT_SERVING until
its model is loaded). The kubelet cannot speak TLS, so with TLS on they probe the plaintext
health-only port (-health-listen), which reports the same statuses.
Args: root, port, probes (startup/readiness/liveness settings).
*/}}
{{- define "loraplex.probes" -}}
{{- $port := .port -}}
{{- if .root.Values.tls.enabled -}}
{{- $port = .root.Values.tls.healthPort -}}
{{- end -}}
{{- $check := dict "grpc" (dict "port" (int $port)) -}}
{{- range $kind := list "startup" "readiness" "liveness" }}
{{ $kind }}Probe:
  {{- toYaml $check | nindent 2 }}
  {{- toYaml (index $.probes $kind) | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod annotations and labels for the meshes. Args: root, component, port, grace. */}}
{{- define "loraplex.meshAnnotations" -}}
{{- $v := .root.Values -}}
{{- if $v.consul.connect.enabled }}
consul.hashicorp.com/connect-inject: "true"
consul.hashicorp.com/connect-service: {{ .service | quote }}
consul.hashicorp.com/connect-service-port: {{ .port | quote }}
consul.hashicorp.com/transparent-proxy: {{ $v.consul.connect.transparentProxy | quote }}
{{- if and $v.consul.connect.transparentProxy $v.consul.connect.excludeProbePorts }}
{{- $ports := list .port }}
{{- if $v.tls.enabled }}{{ $ports = append $ports $v.tls.healthPort }}{{ end }}
{{- if $v.metrics.enabled }}{{ $ports = append $ports $v.metrics.port }}{{ end }}
consul.hashicorp.com/transparent-proxy-exclude-inbound-ports: {{ join "," $ports | quote }}
{{- end }}
consul.hashicorp.com/enable-sidecar-proxy-lifecycle: "true"
consul.hashicorp.com/sidecar-proxy-lifecycle-shutdown-grace-period-seconds: {{ .grace | quote }}
{{- with $v.consul.connect.annotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- if $v.istio.enabled }}
proxy.istio.io/config: {{ printf "{\"holdApplicationUntilProxyStarts\": true, \"terminationDrainDuration\": \"%ds\"}" (int .grace) | quote }}
{{- with $v.istio.annotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "loraplex.meshLabels" -}}
{{- if .Values.istio.enabled }}
sidecar.istio.io/inject: "true"
{{- end }}
{{- end -}}

{{/* Default topology spread: nodes and zones, best effort. Args: root, selector (YAML). */}}
{{- define "loraplex.topologySpread" -}}
{{- if .constraints }}
{{- toYaml .constraints }}
{{- else }}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- .selector | nindent 6 }}
- maxSkew: 1
  topologyKey: topology.kubernetes.io/zone
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- .selector | nindent 6 }}
{{- end }}
{{- end -}}

{{- define "loraplex.shard.serverName" -}}
{{- default (include "loraplex.shard.fullname" .) .Values.tls.shard.serverName -}}
{{- end -}}
