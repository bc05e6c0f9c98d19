"""Who may have what: the rules of `[policy]` (`wlidd.policy` makes decisions from them)."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator, model_validator

from wlidd.config.values import _matcher, _Strict
from wlidd.errors import InvalidValue
from wlidd.workload.model import check_executable, check_sha256
from wlidd.workload.units import check_unit_selector


class AccessRule(_Strict):
    """Who may have something. Selectors of four kinds; every kind a rule gives must match (AND), any
    entry of a kind may (OR), as SPIRE's selectors combine:

      - who: Unix `users` and `groups` (by name or number; either may match) on the Unix sockets and the
        metadata listener; `spiffe_ids` (SPIFFE ID matchers) for the mTLS listener's callers;
      - `units`: the caller's systemd unit (plain, instance, or a template for all its instances);
      - `executables`: the path the caller runs (/proc/PID/exe), absolute and normalized;
      - `sha256`: that file's SHA-256, 64 lowercase hex digits.
    A rule with units, executables or sha256 but no users or groups admits any uid they match. Those
    three are checked for Unix socket callers only (wlidd.workload): a TCP caller never matches them."""

    users: tuple[str | int, ...] = ()
    groups: tuple[str | int, ...] = ()
    spiffe_ids: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    executables: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_matchers(self) -> AccessRule:
        for pattern in self.spiffe_ids:
            _matcher(pattern)
        return self

    @field_validator("units", "executables", "sha256")
    @classmethod
    def _check_process_selectors(cls, entries: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        check = {"units": check_unit_selector, "executables": check_executable, "sha256": check_sha256}[
            str(info.field_name)
        ]
        try:
            for entry in entries:
                check(entry)
        except InvalidValue as exc:  # pydantic reports a ValueError against the key (wlidd.config.values)
            raise ValueError(exc.message) from None
        return entries


class PolicyConfig(_Strict):
    """Who may call what over the Unix socket. Per-name rules replace the defaults for that name."""

    tokens: AccessRule = Field(default_factory=lambda: AccessRule(users=("root",), groups=("wlidd-clients",)))
    credentials: AccessRule = Field(default_factory=lambda: AccessRule(users=("root",)))
    token: dict[str, AccessRule] = Field(default_factory=dict)
    identity: dict[str, AccessRule] = Field(default_factory=dict)
