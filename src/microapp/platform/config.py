"""Typed settings read once from the environment and passed into every service.

Each settings class is a pydantic-settings model whose fields name their variable
(`validation_alias`), type and bounds. `Settings.from_env(env)` reads them from an explicit
mapping (the process environment by default), so tests pass plain dicts; a value the model
refuses becomes one `ConfigError` naming the variable and the value, which `microapp serve`
prints before exiting with code 2.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import AliasChoices, AliasPath, BaseModel, Field, ValidationError, field_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


def split_list(value: object) -> object:
    """A comma-separated variable as a tuple; blanks are dropped."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


# A comma-separated list variable (`a, b,c`), kept from pydantic-settings' JSON decoding.
CommaList = Annotated[tuple[str, ...], NoDecode]


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._mapping = env
        super().__init__(settings_cls, case_sensitive=True, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return dict(self._mapping)


class Settings(BaseSettings):
    """Base of every settings model: frozen, built from an explicit mapping by `from_env`.

    Fields that are themselves `Settings` read the same mapping, so a service's model can
    carry the common one (`common: CommonSettings`).
    """

    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what `from_env` (or a test) passes: never os.environ behind the caller's back.
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **values: Any) -> Self:
        """Read the model's variables from `env` (default: os.environ); unset or empty
        variables keep their defaults, `values` (by field name) override both.

        Raises `ConfigError` naming the variable and the value it refuses.
        """
        source = {k: v.strip() for k, v in (os.environ if env is None else env).items()}
        source = {k: v for k, v in source.items() if v}
        read = _MappingSource(cls, source)()
        for name, field in cls.model_fields.items():
            model = field.annotation
            if isinstance(model, type) and issubclass(model, Settings) and name not in values:
                read[name] = model.from_env(source)
        try:
            return cls(**{**read, **values})
        except ValidationError as exc:
            raise ConfigError(describe(exc, cls)) from None


def env_name(model: type[BaseModel], field: str) -> str:
    """The variable a field is read from (its alias), or the field's own name."""
    alias = model.model_fields[field].validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices | AliasPath):
        raise TypeError("settings read one variable per field")
    return field


def env_names(model: type[Settings]) -> Iterator[str]:
    """Every variable `model` reads, nested settings included."""
    for field in model.model_fields.values():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, Settings):
            yield from env_names(nested)
        elif isinstance(field.validation_alias, str):
            yield field.validation_alias


# pydantic's error types, in the words the services have always used.
_WHAT = {
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be a boolean (1/0, true/false)",
    "bool_type": "must be a boolean (1/0, true/false)",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least"),
    "less_than_equal": ("le", "must be at most"),
    "greater_than": ("gt", "must be more than"),
    "less_than": ("lt", "must be less than"),
}


def describe(exc: ValidationError, model: type[BaseModel]) -> str:
    """One clause per refused value: `NAME must be an integer, got 'x'`."""
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        field = str(loc[0]) if loc else ""
        name = env_name(model, field) if field in model.model_fields else field
        kind = error["type"]
        if kind in _BOUNDS:
            key, words = _BOUNDS[kind]
            what = f"{words} {error.get('ctx', {}).get(key)}"
        else:
            what = _WHAT.get(kind, str(error["msg"]).removeprefix("Value error, "))
        # A message that already names the variable (a parser's own) stands as it is.
        problem = what if what.startswith(name) else f"{name} {what}, got {error['input']!r}"
        problems.append(problem)
    return "; ".join(problems)


def variable(name: str, default: Any = PydanticUndefined, **constraints: Any) -> Any:
    """A field read from environment variable `name` (a `Field` with its alias)."""
    return Field(default, validation_alias=name, **constraints)


def http_url(value: str) -> str:
    """An absolute http(s) URL without its trailing slash; `ValueError` otherwise."""
    value = value.rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("must be an http(s):// URL")
    return value


# What `logging` accepts as a level name (LOG_LEVEL is case-insensitive).
LOG_LEVELS = tuple(logging.getLevelNamesMapping())


class CoalesceSettings(Settings):
    """Whether synchronous writes are coalesced, and the largest batch one flush commits."""

    enabled: bool = variable("DB_COALESCE", True)
    max_batch: int = variable("DB_COALESCE_MAX_BATCH", 100, ge=1)


class IdempotencySettings(Settings):
    """How long outcomes are kept, how long a repeat waits, when a claim is abandoned."""

    ttl_s: float = variable("IDEMPOTENCY_TTL_S", 24 * 3600.0, ge=1.0)
    wait_s: float = variable("IDEMPOTENCY_WAIT_S", 10.0, ge=0.0)
    lease_s: float = variable("IDEMPOTENCY_LEASE_S", 30.0, ge=1.0)
    prune_interval_s: float = variable("IDEMPOTENCY_PRUNE_INTERVAL_S", 300.0, ge=1.0)
    memory_keys: int = variable("IDEMPOTENCY_MEMORY_KEYS", 10_000, ge=1)


class CommonSettings(Settings):
    """What every service reads: where to listen, its database, CORS and telemetry names."""

    # The registry's name of the service; not a variable.
    service: str = ""
    host: str = variable("HOST", "0.0.0.0")
    # The registry passes the service's own port and OpenTelemetry name as defaults.
    port: int = variable("PORT", 8080, ge=0, le=65535)
    database_url: str | None = variable("DATABASE_URL", None)
    cors_allowed_origins: CommaList = variable("CORS_ALLOWED_ORIGINS", ())
    otel_service_name: str = variable("OTEL_SERVICE_NAME", "")
    otel_exporter_endpoint: str | None = variable("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    log_level: str = variable("LOG_LEVEL", "INFO")
    access_log: bool = variable("ACCESS_LOG", True)
    # Connect's read limit for one message; not a variable.
    max_body_bytes: int = 1024 * 1024
    auth_required: bool = variable("AUTH_REQUIRED", False)
    auth_jwks_url: str | None = variable("AUTH_JWKS_URL", None)
    # How long fetched keys are trusted (authn.JwksClient).
    auth_jwks_ttl_s: float = variable("AUTH_JWKS_TTL_S", 300.0, ge=1.0)
    coalesce: CoalesceSettings = Field(default_factory=CoalesceSettings)
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)

    _split = field_validator("cors_allowed_origins", mode="before")(split_list)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (or postgres://)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.upper()
            if value not in LOG_LEVELS:
                raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value
