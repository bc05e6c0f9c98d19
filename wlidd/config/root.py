"""The whole configuration (`Config`: `[daemon]`, `[identities.*]`, `[tokens.*]`, `[listeners.*]`,
`[policy]`), the checks that span its tables (names, references, sink places), and where the file is."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from wlidd.config.identities import IdentityConfig
from wlidd.config.listeners import ListenersConfig
from wlidd.config.policy import PolicyConfig
from wlidd.config.tokens import TokenConfig
from wlidd.config.values import ExpandedPath, _Strict

DEFAULT_CONFIG_PATH = Path("/etc/wlidd/wlidd.toml")
ENV_PREFIX = "WLIDD_"


class DaemonConfig(_Strict):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    runtime_dir: ExpandedPath = Path("/run/wlidd")


class Config(BaseModel):
    """The whole configuration. Build it with :func:`load_config`; it applies the ``WLIDD_*`` environment
    through a subclass made with pydantic-settings (wlidd.config.environment), imported only then."""

    # validate_default as in pydantic-settings' BaseSettings, so a file validates alike with or without it
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    identities: dict[str, IdentityConfig] = Field(default_factory=dict)
    tokens: dict[str, TokenConfig] = Field(default_factory=dict)
    listeners: ListenersConfig = Field(default_factory=ListenersConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @model_validator(mode="after")
    def _check_names(self) -> Config:
        for kind, names in (("identity", self.identities), ("token", self.tokens)):
            for name in names:
                if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                    raise ValueError(f"{kind} name {name!r} may only hold letters, digits, '_', '.', '-'")
        for kind, rules, known_names in (
            ("token", self.policy.token, self.tokens),
            ("identity", self.policy.identity, self.identities),
        ):
            for name in rules:
                if name not in known_names:
                    raise ValueError(f"policy.{kind}.{name}: no {kind} named {name!r}")
        mtls = self.listeners.mtls
        if mtls is not None and mtls.identity not in self.identities:
            raise ValueError(f"listeners.mtls.identity: no identity named {mtls.identity!r}")
        metadata = self.listeners.metadata
        if metadata is not None:
            if metadata.token not in self.tokens:
                raise ValueError(f"listeners.metadata.token: no token named {metadata.token!r}")
            source = self.tokens[metadata.token]
            if metadata.email is None and (source.impersonate is None):
                raise ValueError("listeners.metadata.email: needed when the token impersonates no service account")
        for name, token in self.tokens.items():
            if token.identity is not None and token.identity not in self.identities:
                known = ", ".join(sorted(self.identities)) or "none"
                raise ValueError(f"tokens.{name}.identity: no identity named {token.identity!r} (configured: {known})")
        # Two sinks in one place would replace each other's generations (or files) on every write; places
        # are compared as real paths, so an alias (/var/run -> /run) is the same place.
        seen: dict[str, str] = {}
        places = [
            (os.path.realpath(sink.dir), f"identities.{name}.sinks[{index}].dir")
            for name, identity in self.identities.items()
            for index, sink in enumerate(identity.sinks)
        ]
        places += [
            (os.path.realpath(sink.path), f"tokens.{name}.sinks[{index}].path")
            for name, token in self.tokens.items()
            for index, sink in enumerate(token.sinks)
        ]
        for place, where in places:
            if place in seen:
                raise ValueError(f"{where}: {place} is also {seen[place]}; each sink needs a place of its own")
            seen[place] = where
        return self


def config_path_from(cli_path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    """``--config`` wins, then ``WLIDD_CONFIG``, then the default path."""
    if cli_path is not None:
        return Path(os.path.expanduser(str(cli_path)))
    if environ.get("WLIDD_CONFIG"):
        return Path(os.path.expanduser(environ["WLIDD_CONFIG"]))
    return DEFAULT_CONFIG_PATH
