#!/usr/bin/env sh
# Creates the Secrets the local overlay references by name, with values made here and
# never written to the repository: the PostgreSQL password, each service's DATABASE_URL
# and the auth signing key. Existing Secrets are kept (tokens and data stay valid).
#   deploy/k8s/overlays/local/create-secrets.sh [namespace]
set -eu
ns=${1:-microapp}
kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"

if ! kubectl -n "$ns" get secret postgres-credentials >/dev/null 2>&1; then
  password=$(openssl rand -hex 24)
  kubectl -n "$ns" create secret generic postgres-credentials --from-literal=password="$password"
  url() { echo "postgresql://microapp:$password@postgres.$ns.svc.cluster.local:5432/$1"; }
  kubectl -n "$ns" create secret generic microapp-database-urls \
    --from-literal=greeter="$(url greeter_db)" \
    --from-literal=caller="$(url caller_db)" \
    --from-literal=gateway="$(url gateway_db)" \
    --from-literal=auth="$(url auth_db)" \
    --from-literal=custom-lang="$(url lang_db)"
fi

if ! kubectl -n "$ns" get secret auth-signing-key >/dev/null 2>&1; then
  key=$(mktemp)
  trap 'rm -f "$key"' EXIT
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -quiet -out "$key"
  kubectl -n "$ns" create secret generic auth-signing-key --from-file=private-key.pem="$key"
fi
