#!/usr/bin/env sh
# Creates the Secrets the local overlay references by name, with values made here and
# never written to the repository: the PostgreSQL superuser's password and one password
# per service role (init-databases.sql), each service's DATABASE_URL naming its own role,
# and the auth signing key. Existing Secrets are kept (tokens and data stay valid).
#   deploy/k8s/overlays/local/create-secrets.sh [namespace]
set -eu
ns=${1:-microapp}
kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"

if ! kubectl -n "$ns" get secret postgres-credentials >/dev/null 2>&1; then
  secret() { openssl rand -hex 24; }
  greeter=$(secret) caller=$(secret) gateway=$(secret) auth=$(secret) lang=$(secret)
  kubectl -n "$ns" create secret generic postgres-credentials \
    --from-literal=password="$(secret)" \
    --from-literal=greeter="$greeter" \
    --from-literal=caller="$caller" \
    --from-literal=gateway="$gateway" \
    --from-literal=auth="$auth" \
    --from-literal=lang="$lang"
  # url ROLE PASSWORD DATABASE
  url() { echo "postgresql://$1:$2@postgres.$ns.svc.cluster.local:5432/$3"; }
  kubectl -n "$ns" delete secret microapp-database-urls --ignore-not-found
  kubectl -n "$ns" create secret generic microapp-database-urls \
    --from-literal=greeter="$(url greeter "$greeter" greeter_db)" \
    --from-literal=caller="$(url caller "$caller" caller_db)" \
    --from-literal=gateway="$(url gateway "$gateway" gateway_db)" \
    --from-literal=auth="$(url auth "$auth" auth_db)" \
    --from-literal=custom-lang="$(url lang "$lang" lang_db)"
fi

if ! kubectl -n "$ns" get secret auth-signing-key >/dev/null 2>&1; then
  key=$(mktemp)
  trap 'rm -f "$key"' EXIT
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -quiet -out "$key"
  kubectl -n "$ns" create secret generic auth-signing-key --from-file=private-key.pem="$key"
fi
