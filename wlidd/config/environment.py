"""The ``WLIDD_*`` environment over the TOML file, read by pydantic-settings (the project's settings
library). `load_config` imports this module only when the environment has such a variable (or the file
needs pydantic-settings' reading: wlidd.config.load `_settings_needed`): pydantic-settings and what it
imports (dotenv, argparse, its sources) cost a daemon about 1 MB and 15 ms of start-up, `wlidd.config`
alone 4.5 MB, that a file alone does not need.

Variables nest with ``__`` (``WLIDD_DAEMON__LOG_LEVEL``), names in any case, a table's value as JSON; the
environment wins over the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from wlidd.config.root import ENV_PREFIX, Config


class _MappingEnvSource(EnvSettingsSource):
    """The environment source, reading a given mapping instead of the process environment."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


class _Settings(BaseSettings, Config):
    """Config, read from its sources: the environment (the mapping given) over the TOML file."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

    _document: ClassVar[Mapping[str, Any]] = {}
    _environ: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _MappingEnvSource(settings_cls, cls._environ),
        ]
        # The file as load_config read it, once, under the environment (what TomlConfigSettingsSource makes
        # of it, without reading the path a second time: a FIFO or a file replaced meanwhile reads the same).
        sources.append(InitSettingsSource(settings_cls, dict(cls._document)))
        return tuple(sources)


def settings_config(document: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """The configuration from the TOML file's `document` (as tomllib parsed it; {} for no file) with
    `environ`'s ``WLIDD_*`` variables over it, merged and validated by pydantic-settings; pydantic's
    ValidationError when it does not fit."""
    _Settings._document, _Settings._environ = document, environ
    try:
        settings = _Settings()
    finally:
        _Settings._document, _Settings._environ = {}, {}
    values = {name: getattr(settings, name) for name in Config.model_fields}
    return Config.model_construct(settings.model_fields_set, **values)  # validated already, as a Config
