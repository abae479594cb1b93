"""What every server option does before it serves a service: logging, telemetry, the app."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

from microapp.platform.logging import configure_logging
from microapp.platform.telemetry import configure_telemetry
from microapp.services import SERVICES, BuiltService, ServiceSpec

# `--server` choices; Hypercorn is the default everywhere (docs/configuration.md).
SERVER_CHOICES = ("hypercorn", "granian", "pyvoy")
SERVER_VARIABLE = "MICROAPP_SERVER"
# The optional servers, each installed by the extra of its name: `microapp[pyvoy]`.
OPTIONAL_SERVERS = ("granian", "pyvoy")
# Names the service to the app module Envoy imports under `--server pyvoy`.
SERVICE_VARIABLE = "MICROAPP_SERVICE"


def prepare_service(
    name: str, env: Mapping[str, str], services: Mapping[str, ServiceSpec] = SERVICES
) -> BuiltService:
    """Configure logging and telemetry for service `name` of `services` (the registry), then
    build its app from `env`.

    Raises `ConfigError` when a setting is unusable.
    """
    spec = services[name]
    service_name = env.get("OTEL_SERVICE_NAME") or spec.otel_service_name
    configure_logging(service_name, level=env.get("LOG_LEVEL", "INFO"))
    # Before the app is built: the instrumentations hook into clients made from here on.
    configure_telemetry(service_name)
    return spec.build({**env, "OTEL_SERVICE_NAME": service_name})


def server_from_env(env: Mapping[str, str]) -> str:
    """The server `microapp serve` and `up` use when `--server` is not given."""
    return env.get("MICROAPP_SERVER", "").strip() or "hypercorn"


def service_from_env(env: Mapping[str, str]) -> str:
    """The service named to the app module Envoy's Python imports (`--server pyvoy`)."""
    return env["MICROAPP_SERVICE"]


def missing_server_message(server: str) -> str | None:
    """Why `server` cannot run here (its extra is not installed), or None when it can."""
    if server in OPTIONAL_SERVERS and importlib.util.find_spec(server) is None:
        return f"--server {server} needs the {server} extra: pip install 'microapp[{server}]'"
    return None
