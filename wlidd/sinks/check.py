"""`wlidd check`: the sinks the daemon would refuse to write (an unknown owner, group or reader), and those
whose owner/group would fail with EPERM for lack of CAP_CHOWN.
"""

from __future__ import annotations

import os

from wlidd.accounts import group_id, user_id
from wlidd.config import Config, CredentialSinkConfig, SinkConfig
from wlidd.sinks.access import CAP_CHOWN, has_capability


def has_cap_chown() -> bool:
    """Whether this process holds CAP_CHOWN."""
    return has_capability(CAP_CHOWN)


def _all_sinks(config: Config) -> list[tuple[str, CredentialSinkConfig | SinkConfig]]:
    """Every sink with its place in the config, for `wlidd check` lines."""
    sinks: list[tuple[str, CredentialSinkConfig | SinkConfig]] = []
    for name, identity in sorted(config.identities.items()):
        sinks += [(f"identities.{name}.sinks[{i}] ({s.dir})", s) for i, s in enumerate(identity.sinks)]
    for name, token in sorted(config.tokens.items()):
        sinks += [(f"tokens.{name}.sinks[{i}] ({s.path})", s) for i, s in enumerate(token.sinks)]
    return sinks


def sink_problems(config: Config) -> list[str]:
    """`wlidd check`: sinks the daemon would refuse to write, one line each: an owner, group or reader
    this host does not know (the daemon logs `… sink write failed` and writes nothing)."""
    problems = []
    for where, sink in _all_sinks(config):
        missing = []
        if sink.owner is not None and user_id(sink.owner) is None:
            missing.append(f"no user {sink.owner!r} (owner)")
        if sink.group is not None and group_id(sink.group) is None:
            missing.append(f"no group {sink.group!r} (group)")
        missing += [f"no user {user!r} (readers)" for user in sink.readers.users if user_id(user) is None]
        missing += [f"no group {group!r} (readers)" for group in sink.readers.groups if group_id(group) is None]
        problems += [f"{where}: {reason} on this host: the sink would not be written" for reason in missing]
    return problems


def ownership_warnings(config: Config) -> list[str]:
    """`wlidd check`: sinks whose owner/group would fail with EPERM. A non-root daemon without
    CAP_CHOWN (the shipped unit: User=wlidd, no capabilities, @chown filtered) can hand a file only
    to itself; `readers` (POSIX ACLs) needs no capability."""
    sinks = _all_sinks(config)
    if not any(s.owner is not None or s.group is not None for _, s in sinks):
        return []
    capable = has_cap_chown()
    euid, groups = os.geteuid(), {os.getegid(), *os.getgroups()}
    shipped_user = user_id("wlidd") is not None
    warnings = []
    for where, sink in sinks:
        if sink.owner is None and sink.group is None:
            continue
        uid = None if sink.owner is None else user_id(sink.owner)
        gid = None if sink.group is None else group_id(sink.group)
        foreign = (uid is not None and uid != euid) or (gid is not None and gid not in groups)
        if not capable and foreign:
            warnings.append(
                f"{where}: owner/group need root or CAP_CHOWN, which this process (uid {euid}) lacks, so the"
                " daemon running like this cannot hand the files over (EPERM); grant access with"
                ' readers = { users = ["..."], groups = ["..."] } instead'
            )
        elif capable and shipped_user:
            warnings.append(
                f"{where}: owner/group work only when wlidd runs as root or with CAP_CHOWN; the shipped unit"
                " (User=wlidd, no capabilities) fails with EPERM: use readers = { users = [...] } instead"
            )
    return warnings
