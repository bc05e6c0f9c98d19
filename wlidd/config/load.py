"""Loading the configuration: the TOML file, the ``WLIDD_*`` environment over it, and each validation
error as one line naming the key and where its value came from (the file, or the environment variable);
and whether the service user could read the file.

The file is read once. Alone it validates as `Config(**document)`, which is what pydantic-settings makes of
it; the environment is merged over it by pydantic-settings (wlidd.config.environment), imported only when
it has a WLIDD_* variable or the document a key pydantic-settings matches differently (`_settings_needed`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from wlidd.accounts import account_by_name, member_of, owner_names
from wlidd.config.identities import CertificateConfigIdentityConfig, FilesIdentityConfig, GceIdentityConfig
from wlidd.config.root import ENV_PREFIX, Config
from wlidd.config.tokens import EntraStsTokenConfig, GceMetadataTokenConfig, X509StsTokenConfig
from wlidd.errors import ConfigError

_VARIANTS: dict[str, tuple[str, dict[str, type[BaseModel]]]] = {
    "identities": (
        "source",
        {"gce": GceIdentityConfig, "certificate_config": CertificateConfigIdentityConfig, "files": FilesIdentityConfig},
    ),
    "tokens": (
        "flow",
        {"entra-sts": EntraStsTokenConfig, "x509-sts": X509StsTokenConfig, "gce-metadata": GceMetadataTokenConfig},
    ),
}
"""Config's tagged unions: top-level key → (discriminator key, tag → model). A validation error inside a
variant has the tag in its location (identities.<name>.<tag>.<key>): `_describe` takes it out again."""


def _env_key_for(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def _check_env_names(environ: Mapping[str, str]) -> None:
    top = set(Config.model_fields)
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name == "WLIDD_CONFIG":
            continue
        first = name[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if first not in top:
            raise ConfigError(f"environment {name}: unknown key {first!r} (known: {', '.join(sorted(top))})")


def _variant_of(loc: tuple[int | str, ...]) -> tuple[str, str, dict[str, type[BaseModel]]] | None:
    """(discriminator key, tag, variants) when `loc` runs through a variant of one of Config's tagged
    unions (identities.<name>.<tag>…, tokens.<name>.<tag>…: pydantic puts the tag in the location)."""
    if len(loc) >= 3 and isinstance(loc[0], str) and loc[0] in _VARIANTS:
        discriminator, variants = _VARIANTS[loc[0]]
        if isinstance(loc[2], str) and loc[2] in variants:
            return discriminator, loc[2], variants
    return None


def _one_of(tags: Iterable[str]) -> str:
    quoted = [repr(tag) for tag in tags]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)


def _needed(model: type[BaseModel], name: str) -> str:
    """A required key of `model` as a "needs" line names it: a table with its own required keys
    ("sts (sts.audience)"), or the key with its description."""
    info = model.model_fields[name]
    table = info.annotation
    if isinstance(table, type) and issubclass(table, BaseModel):
        keys = [f"{name}.{key}" for key, field in table.model_fields.items() if field.is_required()]
        return f"{name} ({', '.join(keys)})" if keys else name
    return f"{name} ({info.description})" if info.description else name


def _describe(error: Mapping[str, Any], path: Path | None, environ: Mapping[str, str]) -> str:
    """One line: where the value came from, the key as written (a union's tag taken out of the location)
    and what is wrong; a key that belongs to another `source` or `flow` says to which."""
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
    variant = _variant_of(loc)
    if variant is not None:
        loc = loc[:2] + loc[3:]
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("union_tag_invalid", "union_tag_not_found") and loc and loc[0] in _VARIANTS:
        discriminator, variants = _VARIANTS[str(loc[0])]
        loc = (*loc, discriminator)
        if error["type"] == "union_tag_invalid":
            message = f"{error['ctx']['tag']!r} is not a {discriminator}: use {_one_of(variants)}"
        else:
            message = f"Field required: {_one_of(variants)}"
    elif error["type"] == "extra_forbidden":
        message = "unknown key"
        if variant is not None and len(loc) == 3:
            discriminator, tag, variants = variant
            owners = [other for other, model in variants.items() if loc[2] in model.model_fields]
            if owners:
                message = f"only for {discriminator} {_one_of(owners)}, not for {discriminator} {tag!r}"
    key = ".".join(str(part) for part in loc) or "(top level)"
    env_name = _env_key_for(loc)
    where = f"environment {env_name}" if env_name in environ else (str(path) if path else "defaults")
    return f"{where}: {key}: {message}"


def _problems(errors: Iterable[Mapping[str, Any]], path: Path | None, environ: Mapping[str, str]) -> list[str]:
    """One line per validation error, except that the keys a variant misses are named on one line, on
    its table ("identities.web: source 'files' needs key, bundle"), where the first of them was."""
    lines: list[str] = []
    needs: dict[tuple[int | str, ...], tuple[int, list[str]]] = {}  # a variant's table → its line, keys
    for error in errors:
        loc = tuple(error["loc"])
        variant = _variant_of(loc)
        if error["type"] == "missing" and variant is not None and len(loc) == 4:
            discriminator, tag, variants = variant
            if loc[:3] not in needs:
                needs[loc[:3]] = (len(lines), [])
                lines.append(f"{path or 'defaults'}: {loc[0]}.{loc[1]}: {discriminator} {tag!r} needs ")
            needs[loc[:3]][1].append(_needed(variants[tag], str(loc[3])))
        else:
            lines.append(_describe(error, path, environ))
    for index, keys in needs.values():
        lines[index] += ", ".join(keys)
    return lines


def _settings_needed(document: Mapping[str, object], environ: Mapping[str, str]) -> bool:
    """Whether pydantic-settings could make of the file and the environment other than `document` as it is,
    so the config must be read through it: a variable it may apply (a name starting ``WLIDD_`` in any case,
    but ``WLIDD_CONFIG``, which names the file), or a top-level key it matches by its name in another case
    (``[Daemon]``) or an unknown one."""
    if any(name.lower().startswith(ENV_PREFIX.lower()) and name != "WLIDD_CONFIG" for name in environ):
        return True
    return any(key not in Config.model_fields for key in document)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError naming the key and the file."""
    env = dict(os.environ if environ is None else environ)
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                document = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except PermissionError:
            raise ConfigError(f"{path}: config file not readable (permission denied)") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _check_env_names(env)
    try:
        if not _settings_needed(document, env):
            return Config(**document)
        from wlidd.config.environment import settings_config

        return settings_config(document, env)
    except ValidationError as exc:
        problems = _problems(exc.errors(), path, env)
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


SERVICE_USER = "wlidd"  # the shipped unit's User=


def unreadable_by_service(path: Path, user: str = SERVICE_USER) -> str | None:
    """Why the service user could not read the config file at `path` (the shipped unit runs as
    `User=wlidd`), or None when it could, or when that user does not exist on this host. Judged from
    the mode bits and ownership of the file and of every directory on the way (execute to traverse),
    with the user's groups from the group database; POSIX ACLs are not consulted (a warning may then
    be too cautious, never silent about the mode)."""
    import stat as stat_module

    account = account_by_name(user)
    if account is None:
        return None
    groups = member_of(user, account.pw_gid)
    if account.pw_uid == 0:
        return None

    def allowed(st: os.stat_result, bits: int) -> bool:
        if st.st_uid == account.pw_uid:
            shift = 6
        elif st.st_gid in groups:
            shift = 3
        else:
            shift = 0
        return (stat_module.S_IMODE(st.st_mode) >> shift) & bits == bits

    absolute = Path(os.path.abspath(path))
    # every directory from / down, to traverse (execute), then the file, to read
    for place, bits in [*((directory, 0o1) for directory in reversed(absolute.parents)), (absolute, 0o4)]:
        try:
            st = os.stat(place)
        except OSError:
            return None
        if allowed(st, bits):
            continue
        mode = stat_module.S_IMODE(st.st_mode)
        if place != absolute:
            return f"directory {place} ({owner_names(st)}, mode {mode:04o}) cannot be traversed by user {user}"
        return (
            f"{absolute} ({owner_names(st)}, mode {mode:04o}) is not readable by user {user}, whom the shipped unit"
            f" runs as (User={user}): the daemon would exit 2 at every start; it holds no secrets:"
            f" chmod 0644 {absolute}"
        )
    return None
