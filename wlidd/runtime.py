"""What a config reload changes, as one immutable value published by one assignment.

As a rotation publishes one IdentityState (wlidd.watch), a reload builds one `Runtime` — the running
config (its live parts as re-read, the rest as started), the resolved policy and the token sources by
name — and publishes it with `RuntimeRef.publish`. Readers (the local API's routes) take `ref.current`
and read what they need from that one value: a token request's source and rule come from one config,
never the old source with the new policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from wlidd.config import Config
from wlidd.policy import Policy

if TYPE_CHECKING:  # the token machinery (httpx, PyJWT) is imported only when a config names a token
    from wlidd.tokens.manager import TokenSource


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The running config (sinks included), its resolved policy, and the token sources serving it."""

    config: Config
    policy: Policy
    tokens: Mapping[str, TokenSource]  # read-only (a MappingProxyType): a new Runtime for a change

    @classmethod
    def of(cls, config: Config, policy: Policy, tokens: Mapping[str, TokenSource]) -> Runtime:
        """A Runtime holding a read-only copy of `tokens`."""
        return cls(config, policy, MappingProxyType(dict(tokens)))


class RuntimeView:
    """Reads the current Runtime of `runtime` (the daemon and the local API): its config, policy, tokens."""

    runtime: RuntimeRef

    @property
    def config(self) -> Config:
        """The running config."""
        return self.runtime.current.config

    @property
    def policy(self) -> Policy:
        """The resolved policy."""
        return self.runtime.current.policy

    @property
    def tokens(self) -> Mapping[str, TokenSource]:
        """The token sources by name."""
        return self.runtime.current.tokens


class RuntimeRef:
    """The one reference to the current Runtime that the daemon and the servers share."""

    __slots__ = ("current",)

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime

    def publish(self, runtime: Runtime) -> Runtime:
        """Make `runtime` current (one assignment); returns the one it replaced."""
        previous, self.current = self.current, runtime
        return previous
