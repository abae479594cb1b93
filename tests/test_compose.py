"""compose/, the Dockerfile and docs/configuration.md, checked against the service registry.

No Docker engine runs here, so the compose file is checked as far as that allows: against
the Compose Specification schema, against the registry (command, port, database, health
check of every service), and its Traefik configuration is loaded by a real Traefik that
routes real service processes. What needs a Docker host is listed in docs/deployment.md.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from microapp.services import SERVICES, ServiceSpec
from microapp.serving import OPTIONAL_SERVERS, SERVER_CHOICES
from tests.support.commands import BIN, run
from tests.support.external import ExternalServer
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
    "/gateway.v1.GatewayService": ("gateway", ["cors", "auth", "rate-limit"]),
    "/auth": ("auth", ["cors", "rate-limit"]),
    "/.well-known": ("auth", ["cors", "rate-limit"]),
    "/": ("web", []),
}
CONNECT_WEB_HEADERS = {
    "Content-Type",
    "Authorization",
    "Connect-Protocol-Version",
    "Connect-Timeout-Ms",
    "Grpc-Timeout",
    "X-Grpc-Web",
    "X-User-Agent",
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


def served_paths(spec: ServiceSpec, tmp_path: Path) -> list[str]:
    """The paths a service's real app answers: its routes and mounts, from the registry."""
    built = spec.build({"AUTH_DEV_KEY_DIR": str(tmp_path / "auth-key")})
    return [*spec.connect_paths, *(route.path for route in built.app.routes)]


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


# What `init-secrets.sh` puts in compose/.env, for the checks that interpolate.
DOT_ENV = {"POSTGRES_PASSWORD": "from-dot-env"}


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
    assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("name", list(SERVICES))
def test_compose_service_health_check_asks_its_own_healthz(name: str) -> None:
    check = compose()["services"][name]["healthcheck"]
    command = " ".join(check["test"])
    assert f"http://127.0.0.1:{SERVICES[name].default_port}/healthz" in command


def test_postgres_init_creates_every_registry_database() -> None:
    sql = (COMPOSE_DIR / "postgres" / "init-databases.sql").read_text()
    created = set(re.findall(r"^CREATE DATABASE (\w+);", sql, flags=re.M))
    assert created == {s.database for s in SERVICES.values() if s.database}


def test_postgres_init_script_is_mounted_into_the_postgres_container() -> None:
    volumes = compose()["services"]["postgres"]["volumes"]
    assert any(
        v.startswith("./postgres/init-databases.sql:/docker-entrypoint-initdb.d/") for v in volumes
    )


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


def test_database_password_comes_from_the_environment_not_the_compose_file() -> None:
    for name in [*SERVICES, "postgres"]:
        env = env_of(compose()["services"][name])
        for value in (env.get("DATABASE_URL"), env.get("POSTGRES_PASSWORD")):
            if value is None:
                continue
            resolved = interpolate(value, DOT_ENV)
            password = urlsplit(resolved).password if "://" in resolved else resolved
            assert password == DOT_ENV["POSTGRES_PASSWORD"], (name, value)
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
        paths = served_paths(spec, tmp_path)
        for prefix in path_prefixes(router["rule"]):
            assert reaches(prefix, paths), f"{prefix} -> {spec.name}, which serves {paths}"


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
        "auth": {"AUTH_PRIVATE_KEY_FILE": str(write_private_key(secrets / "auth.pem"))},
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
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{routed.url}/debug/breaker") as resp,
    ):
        assert resp.status == 200
        state = await resp.json()
    assert state["state"] == "closed"


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


def test_dockerfile_installs_the_package_from_pyproject_and_nothing_else() -> None:
    instructions = dockerfile_instructions()
    copies = [rest for keyword, rest in instructions if keyword == "COPY" and "--from" not in rest]
    assert copies == ["pyproject.toml README.md ./", "src ./src"]
    installs = [
        re.findall(r"pip install ([^&]*)", rest)
        for keyword, rest in instructions
        if keyword == "RUN" and "pip install" in rest
    ]
    # One install of `.` with the optional servers' extras (so MICROAPP_SERVER can pick
    # any of them): pyproject's lists, no second one.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = ",".join(name for name in SERVER_CHOICES if name in OPTIONAL_SERVERS)
    assert set(OPTIONAL_SERVERS) <= set(pyproject["project"]["optional-dependencies"])
    assert [[args.split() for args in found] for found in installs] == [[[f'".[{extras}]"']]]
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
        "!src/",
    }


# --- docs/configuration.md -------------------------------------------------------------

_VARIABLE = re.compile(r"[A-Z][A-Z0-9_]*")


def _is_environment(node: ast.expr) -> bool:
    """`env`, `environ` or `os.environ`: what the code reads its settings from."""
    return (isinstance(node, ast.Name) and node.id in {"env", "environ"}) or (
        isinstance(node, ast.Attribute) and node.attr == "environ"
    )


def _variable(node: ast.expr | None) -> str | None:
    is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
    if is_text and _VARIABLE.fullmatch(node.value):  # type: ignore[union-attr]
        return node.value  # type: ignore[union-attr]
    return None


def variables_read_by(source: str) -> set[str]:
    """The env variable names a module reads: `env.get("X")`, `env["X"]`, `getenv("X")`,
    any `helper(env, "X", ...)` (env_str, env_int, ...), and the names kept in a
    module-level `*_VARIABLES` mapping that a helper reads."""
    names: set[str] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        found: list[str | None] = []
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "get"
                and _is_environment(func.value)
            ):
                found.append(_variable(node.args[0] if node.args else None))
            if (
                isinstance(func, ast.Attribute | ast.Name)
                and getattr(func, "attr", getattr(func, "id", "")) == "getenv"
            ):
                found.append(_variable(node.args[0] if node.args else None))
            if len(node.args) >= 2 and _is_environment(node.args[0]):
                found.append(_variable(node.args[1]))
        elif isinstance(node, ast.Subscript) and _is_environment(node.value):
            found.append(_variable(node.slice))
        names |= {name for name in found if name}
    for statement in tree.body:
        if isinstance(statement, ast.Assign | ast.AnnAssign):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            if any(isinstance(t, ast.Name) and t.id.endswith("_VARIABLES") for t in targets):
                assert statement.value is not None
                names |= {n for c in ast.walk(statement.value) if (n := _variable(c))}  # type: ignore[arg-type]
    return names


def variables_in_source() -> dict[str, set[str]]:
    """Every env variable src/microapp reads by name, with the files that read it."""
    found: dict[str, set[str]] = {}
    package = ROOT / "src" / "microapp"
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "gen":
            continue
        for name in variables_read_by(path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def documented_variables() -> set[str]:
    """The first column of every table row in docs/configuration.md."""
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", CONFIGURATION_DOC.read_text(), re.M))


class RecordingEnv(dict[str, str]):
    """An environment that remembers every name a service's settings look up."""

    def __init__(self, preset: dict[str, str]) -> None:
        super().__init__(preset)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)


def test_every_env_variable_the_code_reads_is_documented() -> None:
    missing = {n: sorted(f) for n, f in variables_in_source().items()}
    missing = {n: f for n, f in missing.items() if n not in documented_variables()}
    assert not missing, f"add these to docs/configuration.md: {missing}"


@pytest.mark.parametrize("name", list(SERVICES))
def test_every_env_variable_a_service_reads_at_startup_is_documented(
    name: str, tmp_path: Path
) -> None:
    env = RecordingEnv({"AUTH_DEV_KEY_DIR": str(tmp_path)})
    SERVICES[name].build(env)
    assert env.asked - documented_variables() == set()


def test_the_source_scan_finds_the_variables_services_read_at_startup(tmp_path: Path) -> None:
    # The scan above must see at least what the services really ask for.
    scanned = set(variables_in_source())
    for spec in SERVICES.values():
        env = RecordingEnv({"AUTH_DEV_KEY_DIR": str(tmp_path)})
        spec.build(env)
        assert env.asked <= scanned, spec.name


def test_configuration_doc_lists_no_variable_the_code_does_not_read() -> None:
    # Standard OpenTelemetry SDK variables are read by the SDK, not by our code.
    stale = {
        name
        for name in documented_variables() - set(variables_in_source())
        if not name.startswith("OTEL_")
    }
    assert not stale
