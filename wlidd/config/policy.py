"""Who may have what: the rules of `[policy]` (`wlidd.policy` makes decisions from them)."""

from __future__ import annotations

from pydantic import Field, model_validator

from wlidd.config.values import _matcher, _Strict


class AccessRule(_Strict):
    """Who may have something: Unix users and groups (by name or number) on the Unix socket and the
    metadata listener; SPIFFE ID matchers on the mTLS listener."""

    users: tuple[str | int, ...] = ()
    groups: tuple[str | int, ...] = ()
    spiffe_ids: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_matchers(self) -> AccessRule:
        for pattern in self.spiffe_ids:
            _matcher(pattern)
        return self


class PolicyConfig(_Strict):
    """Who may call what over the Unix socket. Per-name rules replace the defaults for that name."""

    tokens: AccessRule = Field(default_factory=lambda: AccessRule(users=("root",), groups=("wlidd-clients",)))
    credentials: AccessRule = Field(default_factory=lambda: AccessRule(users=("root",)))
    token: dict[str, AccessRule] = Field(default_factory=dict)
    identity: dict[str, AccessRule] = Field(default_factory=dict)
