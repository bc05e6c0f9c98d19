"""What a re-read config changes, section by section: applied live, or left for a restart.

A pure decision over the running config and the one just read; the daemon applies it on SIGHUP
(wlidd.daemon `reload`). The rules, in the order they apply:

  [daemon]            log_level, log_format: live; runtime_dir: restart
  [policy]            live (the daemon resolves it again on every reload: a name NSS did not know may exist now)
  [identities.<n>]    only its sinks changed: live; anything else, or added, or removed: restart
  [tokens.<n>]        unchanged: nothing; its identity not running: restart; the token the metadata listener
                      serves added, removed or its flow changed: restart; only its sinks changed: live (the
                      running source takes the new config); anything else: the source is replaced (stopped,
                      then started again from the new config, or removed when the new config has none)
  [listeners]         restart

`ConfigChanges.running` is the config that runs after the reload: the new live parts, and the old version
of everything that needs a restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from wlidd.config import Config

TokenChange = Literal["sinks", "replaced"]  # only its sinks changed | the source is replaced (or removed)


@dataclasses.dataclass(frozen=True)
class ConfigChanges:
    """What a reload from `old` to `new` does (see the module docstring); the policy is the daemon's to
    compare once resolved."""

    running: Config  # what runs after the reload
    logging: bool  # log_level or log_format changed
    identity_sinks: tuple[str, ...]  # identities whose sinks changed, by name
    tokens: Mapping[str, TokenChange]  # token sources that change, in the configs' order
    restart: tuple[str, ...]  # the sections that changed and take effect only after a restart

    @property
    def live(self) -> bool:
        """Whether anything but the policy changes now."""
        return self.logging or bool(self.identity_sinks) or bool(self.tokens)


def config_changes(old: Config, new: Config) -> ConfigChanges:
    """The changes from the running config `old` to the re-read `new` (see the module docstring)."""
    restart: list[str] = []
    if new.daemon.runtime_dir != old.daemon.runtime_dir:
        restart.append("daemon.runtime_dir")
    identities = dict(old.identities)
    identity_sinks: list[str] = []
    for name in sorted(set(old.identities) | set(new.identities)):
        before, after = old.identities.get(name), new.identities.get(name)
        if before is None or after is None:
            restart.append(f"identities.{name} (added or removed)")
        elif before.model_dump(exclude={"sinks"}) != after.model_dump(exclude={"sinks"}):
            restart.append(f"identities.{name}")
        elif before.sinks != after.sinks:
            identities[name] = after
            identity_sinks.append(name)
    tokens = dict(old.tokens)
    changes: dict[str, TokenChange] = {}
    pinned = old.listeners.metadata.token if old.listeners.metadata is not None else None
    for name in dict.fromkeys([*old.tokens, *new.tokens]):
        was, wanted = old.tokens.get(name), new.tokens.get(name)
        if was == wanted:
            continue
        if wanted is not None and wanted.identity is not None and wanted.identity not in old.identities:
            restart.append(f"tokens.{name} (its identity is not running)")
        elif name == pinned and (wanted is None or was is None or was.flow != wanted.flow):
            restart.append(f"tokens.{name} (served by the metadata listener)")
        else:
            sinks_only = (
                was is not None
                and wanted is not None
                and was.model_dump(exclude={"sinks"}) == wanted.model_dump(exclude={"sinks"})
            )
            changes[name] = "sinks" if sinks_only else "replaced"
            if wanted is None:
                tokens.pop(name, None)
            else:
                tokens[name] = wanted
    if new.listeners != old.listeners:
        restart.append("listeners")
    daemon = new.daemon.model_copy(update={"runtime_dir": old.daemon.runtime_dir})
    update = {"daemon": daemon, "policy": new.policy, "identities": identities, "tokens": tokens}
    return ConfigChanges(
        running=old.model_copy(update=update),
        logging=(new.daemon.log_level, new.daemon.log_format) != (old.daemon.log_level, old.daemon.log_format),
        identity_sinks=tuple(identity_sinks),
        tokens=changes,
        restart=tuple(restart),
    )
