{{/*
Names, labels and the few values the chart derives rather than reads.
*/}}

{{- define "kura.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release's full name. A release already named after the chart is not
doubled ("kura", not "kura-kura"). Kept to 52 characters so that
"<fullname>-headless" still fits a 63-character DNS label.
*/}}
{{- define "kura.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The headless Service that gives each pod a DNS name and peers discovery. */}}
{{- define "kura.headlessName" -}}
{{- printf "%s-headless" (include "kura.fullname" .) -}}
{{- end -}}

{{/* Fully qualified name of the headless Service (KURA_DISCOVERY_DNS_NAME). */}}
{{- define "kura.headlessFqdn" -}}
{{- printf "%s.%s.svc.%s" (include "kura.headlessName" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/*
This pod's internal base URL (KURA_NODE_URL). $(POD_NAME) is expanded by the
kubelet from the downward-API variable declared before it. The scheme follows
peer mTLS: the node rejects a URL whose scheme does not match.
*/}}
{{- define "kura.nodeUrl" -}}
{{- $scheme := ternary "https" "http" (.Values.peerTls.enabled | default false) -}}
{{- printf "%s://$(POD_NAME).%s:%d" $scheme (include "kura.headlessFqdn" .) (.Values.ports.internal | int) -}}
{{- end -}}

{{- define "kura.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kura.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kura.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kura.labels" -}}
helm.sh/chart: {{ include "kura.chart" . }}
{{ include "kura.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kura.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kura.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kura.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds = ceil(drain ms / 1000) + preStop delay + slack.
The preStop hook runs inside the grace period, and SIGTERM starts the drain
wait only after it, so the period must hold both plus time to stop cleanly.
Integer arithmetic: values arrive as float64 and printing a float would give
"2.75e+02".
*/}}
{{- define "kura.terminationGracePeriodSeconds" -}}
{{- $drainMs := .Values.config.drainCompletionTimeoutMs | int64 -}}
{{- $drainSeconds := div (add $drainMs 999) 1000 -}}
{{- add $drainSeconds (.Values.preStopDelaySeconds | int64) (.Values.terminationGraceExtraSeconds | int64) -}}
{{- end -}}

{{/* Name of the ConfigMap holding the extension script. */}}
{{- define "kura.extensionConfigMap" -}}
{{- default (printf "%s-extension" (include "kura.fullname" .)) .Values.extension.existingConfigMap -}}
{{- end -}}

{{/*
Name of the Secret holding the peer secret: the user's, or the one the chart
generates once (templates/secret-peer-auth.yaml).
*/}}
{{- define "kura.peerAuthSecretName" -}}
{{- default (printf "%s-peer-auth" (include "kura.fullname" .)) .Values.peerAuth.existingSecret -}}
{{- end -}}

{{/*
Whether the pods get a peer secret: always, unless peerAuth.insecure is set
without a Secret of the user's.
*/}}
{{- define "kura.peerSecretWired" -}}
{{- if or .Values.peerAuth.existingSecret (not .Values.peerAuth.insecure) -}}true{{- end -}}
{{- end -}}

{{/*
Name of the Secret holding the public tokens file (auth.mode tokens): the
user's, or the one the chart generates once (templates/secret-auth.yaml).
*/}}
{{- define "kura.authSecretName" -}}
{{- default (printf "%s-auth" (include "kura.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/*
KURA_INTERNAL_TLS_PEER_NAMES: the SAN patterns a peer's client certificate
must carry. By default the per-pod names the chart already requires the
certificates to be valid for ("*." matches exactly one label: the pod name).
*/}}
{{- define "kura.peerNames" -}}
{{- if .Values.peerTls.peerNames -}}
{{- join "," .Values.peerTls.peerNames -}}
{{- else -}}
{{- printf "*.%s" (include "kura.headlessFqdn" .) -}}
{{- end -}}
{{- end -}}

{{/*
The data of a Secret the chart generates once and keeps: what the live
Secret already holds (found with `lookup`, so `helm upgrade` and a reinstall
over a kept Secret reuse it), plus a fresh random value for every key in
.generate it lacks. Keys an operator added by hand (a rotation's next peer
secret) are kept too. Returns the data map as JSON (base64 values), since
`include` can only return a string.

Without a cluster (`helm template`, `--dry-run=client`, Argo CD) `lookup`
returns nothing and every render generates new values: supply an
existingSecret there.

Arguments: dict with .root (the chart's top context), .name (the Secret)
and .generate (key -> length of the random alphanumeric value).
*/}}
{{- define "kura.keptSecretData" -}}
{{- $live := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- $data := dict -}}
{{- if $live -}}
{{- $data = merge $data (get $live "data" | default dict) -}}
{{- end -}}
{{- range $key, $length := .generate -}}
{{- if not (get $data $key) -}}
{{- $_ := set $data $key (randAlphaNum ($length | int) | b64enc) -}}
{{- end -}}
{{- end -}}
{{- toJson $data -}}
{{- end -}}

{{/* Fail early on half-configured optional features. */}}
{{- define "kura.validate" -}}
{{- if not (has .Values.auth.mode (list "tokens" "open" "extension")) -}}
{{- fail (printf "auth.mode must be tokens, open or extension, not %q" (toString .Values.auth.mode)) -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "extension") (not .Values.extension.enabled) -}}
{{- fail "auth.mode extension needs extension.enabled (and extension.script or extension.existingConfigMap): without the extension no request would be authenticated" -}}
{{- end -}}
{{- if and .Values.extension.enabled (not .Values.extension.script) (not .Values.extension.existingConfigMap) -}}
{{- fail "extension.enabled needs extension.script or extension.existingConfigMap" -}}
{{- end -}}
{{- if and .Values.peerTls.enabled (not .Values.peerTls.secretName) -}}
{{- fail "peerTls.enabled needs peerTls.secretName (a Secret with ca.crt, tls.crt and tls.key)" -}}
{{- end -}}
{{- if and .Values.publicTls.enabled (not .Values.publicTls.secretName) -}}
{{- fail "publicTls.enabled needs publicTls.secretName (a Secret with tls.crt and tls.key)" -}}
{{- end -}}
{{- if eq (.Values.ports.http | int) (.Values.ports.internal | int) -}}
{{- fail "ports.internal must differ from ports.http" -}}
{{- end -}}
{{- end -}}
