"""Typed settings read once from the environment and passed into every service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    """The variable's value, or the default when it is unset or empty."""
    value = env.get(name, "").strip()
    return value or default


def env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    """An integer variable, refused with a clear message when it is not one."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    """A number variable, refused with a clear message when it is not one."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A flag: 1/true/yes/on or 0/false/no/off."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list; blanks are dropped."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class CommonSettings:
    """What every service reads: where to listen, its database, CORS and telemetry names."""

    service: str
    host: str = "0.0.0.0"
    port: int = 8080
    database_url: str | None = None
    cors_allowed_origins: tuple[str, ...] = ()
    otel_service_name: str = ""
    otel_exporter_endpoint: str | None = None
    max_body_bytes: int = 1024 * 1024
    auth_required: bool = False
    auth_jwks_url: str | None = None

    @classmethod
    def from_env(
        cls,
        service: str,
        *,
        default_port: int,
        default_otel_name: str,
        env: Mapping[str, str] | None = None,
    ) -> CommonSettings:
        """Read the common variables (PORT, HOST, DATABASE_URL, ...) for one service."""
        env = os.environ if env is None else env
        database_url = env.get("DATABASE_URL", "").strip() or None
        if database_url and not database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("DATABASE_URL must start with postgresql:// (or postgres://)")
        port = env_int(env, "PORT", default_port)
        if port > 65535:
            raise ConfigError(f"PORT must be at most 65535, got {port}")
        return cls(
            service=service,
            host=env_str(env, "HOST", "0.0.0.0"),
            port=port,
            database_url=database_url,
            cors_allowed_origins=env_list(env, "CORS_ALLOWED_ORIGINS"),
            otel_service_name=env_str(env, "OTEL_SERVICE_NAME", default_otel_name),
            otel_exporter_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or None,
            auth_required=env_bool(env, "AUTH_REQUIRED", False),
            auth_jwks_url=env.get("AUTH_JWKS_URL", "").strip() or None,
        )
