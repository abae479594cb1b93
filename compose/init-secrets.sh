#!/usr/bin/env sh
# Makes what compose needs but the repository never holds: random database passwords in
# compose/.env (the PostgreSQL superuser's, and one per service role) and the auth
# service's RSA signing key in compose/secrets/. Existing values are kept, so running it
# again changes nothing (and issued tokens stay valid); a missing password is added.
set -eu
cd "$(dirname "$0")"
umask 077

if [ ! -f .env ]; then
  cat > .env <<ENV
# Made by init-secrets.sh; never commit this file.
# Uncomment both to run the OpenTelemetry collector and Jaeger and send telemetry there:
# COMPOSE_PROFILES=observability
# OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4318
ENV
  echo "wrote compose/.env"
fi

# The superuser (administration only) and each service's own role (init-databases.sql).
for name in POSTGRES_PASSWORD GREETER_DB_PASSWORD CALLER_DB_PASSWORD GATEWAY_DB_PASSWORD \
  AUTH_DB_PASSWORD LANG_DB_PASSWORD; do
  if ! grep -q "^$name=" .env; then
    echo "$name=$(openssl rand -hex 24)" >> .env
    echo "added $name to compose/.env"
  fi
done

mkdir -p secrets
chmod 0700 secrets
if [ ! -f secrets/auth_private_key.pem ]; then
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -quiet -out secrets/auth_private_key.pem
  # The container runs as uid 10001 and reads the key through a bind mount, which keeps
  # these host permissions; the folder (0700) keeps other host users out.
  chmod 0644 secrets/auth_private_key.pem
  echo "wrote compose/secrets/auth_private_key.pem"
fi
