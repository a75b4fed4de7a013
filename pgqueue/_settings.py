"""Settings read from ``PGQUEUE_*`` environment variables, one pydantic-settings model per area.

:class:`EnvSettings` is the shared base: the client's :class:`ClientEnv` lives here, the worker's
and the admin's models next to the settings they feed (:mod:`pgqueue.worker.settings`,
:mod:`pgqueue.admin.settings`). A model only says what the environment holds (``None``: not set,
empty counts as not set); the code that builds a queue, a worker or an admin lays explicit
arguments over it and keeps its own defaults and checks. Models are built by
:meth:`EnvSettings.load` when the settings are needed, never at import: CLIs and tests set the
environment after pgqueue is imported.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextvars import ContextVar
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pgqueue._naming import DEFAULT_SCHEMA
from pgqueue.errors import ConfigurationError

ENV_PREFIX = "PGQUEUE_"

# The mapping load() was given in place of os.environ (tests, app_from_env(environ)); a context
# variable because pydantic-settings builds its sources inside the model's constructor.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("pgqueue_environ", default=None)


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading the mapping given to :meth:`EnvSettings.load`
    when there is one."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        if environ is None:
            return super()._load_env_vars()
        return {
            (key if self.case_sensitive else key.lower()): value
            for key, value in environ.items()
            if not (self.env_ignore_empty and value == "")
        }


def strip(value: Any) -> Any:
    """Surrounding blanks in a variable are a typo (``KEY= on``), not part of the value; blank
    counts as not set, like empty."""
    if isinstance(value, str):
        return value.strip() or None
    return value


Stripped = Annotated[str | None, BeforeValidator(strip)]


class EnvSettings(BaseSettings):
    """Base of the ``PGQUEUE_*`` models: field ``x`` is variable ``<env_prefix>X``, empty values
    are unset, and a malformed value is a :class:`ConfigurationError` naming the variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid", validate_by_name=True
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
        # Explicit values over the environment; no .env or secrets directory, as before.
        return (init_settings, _EnvironSource(settings_cls))

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, *, only: Collection[str] = (), **explicit: Any
    ) -> Self:
        """The model from ``environ`` (default ``os.environ``) as it is now, with non-None
        ``explicit`` values winning over the environment's.

        With ``only``, a malformed variable outside those fields is left at its default instead
        of raising: a read that needs one variable fails for that variable only, as each did when
        it was read on its own.
        """
        values = {name: value for name, value in explicit.items() if value is not None}
        token = _ENVIRON.set(environ)
        try:
            try:
                return cls(**values)
            except ValidationError as exc:
                bad = {cls._field_of(error["loc"]) for error in exc.errors()}
                if not only or None in bad or not bad.isdisjoint([*only, *values]):
                    raise ConfigurationError(cls.describe(exc)) from exc
            defaults = {name: cls.model_fields[name].get_default() for name in bad if name is not None}
            return cls(**values, **defaults)
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def _field_of(cls, loc: tuple[int | str, ...]) -> str | None:
        """The field an error's location names (by field name or by its variable), if any."""
        where = str(loc[0]) if loc else ""
        if where in cls.model_fields:
            return where
        return next((name for name in cls.model_fields if cls.variable(name) == where.upper()), None)

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable behind ``field``."""
        alias = cls.model_fields[field].validation_alias
        if isinstance(alias, str):
            return alias
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @classmethod
    def describe(cls, exc: ValidationError) -> str:
        """pydantic's errors as one line of ``VARIABLE='value': reason``, the way an operator
        editing an env file reads them."""
        parts = []
        for error in exc.errors():
            field = cls._field_of(error["loc"])
            name = cls.variable(field) if field else ".".join(map(str, error["loc"])).upper()
            reason = error["msg"].removeprefix("Value error, ")
            parts.append(f"{name}={error['input']!r}: {reason}")
        return "; ".join(parts)


class ClientEnv(EnvSettings):
    """What :class:`~pgqueue.Queue`, :class:`~pgqueue.AsyncQueue` and the CLI read from the
    environment; an argument given in code or on the command line wins over each."""

    dsn: str | None = None
    """``PGQUEUE_DSN``: the database when none is passed."""
    database_url: str | None = Field(None, validation_alias="DATABASE_URL")
    """``DATABASE_URL``: the database when neither a DSN nor ``PGQUEUE_DSN`` is given (the name
    hosting platforms set)."""
    schema_name: str | None = Field(None, validation_alias="PGQUEUE_SCHEMA")
    """``PGQUEUE_SCHEMA``: the schema holding pgqueue's tables, so one env file serves CLI and app."""
    connect_wait: float | None = Field(None, ge=0, allow_inf_nan=False)
    """``PGQUEUE_CONNECT_WAIT``: seconds to keep retrying a server that is briefly away."""
    prepared_statements: Annotated[bool | None, BeforeValidator(strip)] = None
    """``PGQUEUE_PREPARED_STATEMENTS``: off behind PgBouncer in transaction mode."""
    app: Stripped = None
    """``PGQUEUE_APP``: the app's queue as ``module:attribute``, for the CLI's commands."""
    log_level: str = "INFO"
    """``PGQUEUE_LOG_LEVEL``: the CLI's log level."""


def resolve_schema(schema: str | None = None) -> str:
    """The schema given (even empty, so a bad one is refused, not replaced), else
    ``PGQUEUE_SCHEMA``, else :data:`~pgqueue._naming.DEFAULT_SCHEMA`."""
    if schema is not None:
        return schema
    return ClientEnv.load(only=("schema_name",)).schema_name or DEFAULT_SCHEMA
