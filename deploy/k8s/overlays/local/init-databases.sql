-- Runs once, when the PostgreSQL volume is first initialised (the image runs it with psql as
-- the superuser): one database per service, each OWNED by that service's own login role and
-- closed to every other role. Each service creates its own tables at startup (migrations).
--
-- The passwords are read by psql from secret files (`<role>_db_password` in
-- $MICROAPP_DB_SECRETS_DIR, default /run/secrets), so none is in the repository, an image
-- or a command line. compose: init-secrets.sh makes them; Kubernetes (local overlay):
-- create-secrets.sh. The same file runs in both (a test keeps them identical).
\set ON_ERROR_STOP on
\set secrets `echo "${MICROAPP_DB_SECRETS_DIR:-/run/secrets}"`

-- Nobody connects to the maintenance database but the superuser.
REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;

\set password `cat :'secrets'/greeter_db_password`
CREATE ROLE greeter LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE greeter_db OWNER greeter;
REVOKE CONNECT, TEMPORARY ON DATABASE greeter_db FROM PUBLIC;

\set password `cat :'secrets'/caller_db_password`
CREATE ROLE caller LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE caller_db OWNER caller;
REVOKE CONNECT, TEMPORARY ON DATABASE caller_db FROM PUBLIC;

\set password `cat :'secrets'/gateway_db_password`
CREATE ROLE gateway LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE gateway_db OWNER gateway;
REVOKE CONNECT, TEMPORARY ON DATABASE gateway_db FROM PUBLIC;

\set password `cat :'secrets'/auth_db_password`
CREATE ROLE auth LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE auth_db OWNER auth;
REVOKE CONNECT, TEMPORARY ON DATABASE auth_db FROM PUBLIC;

\set password `cat :'secrets'/lang_db_password`
CREATE ROLE lang LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE lang_db OWNER lang;
REVOKE CONNECT, TEMPORARY ON DATABASE lang_db FROM PUBLIC;

\unset password
