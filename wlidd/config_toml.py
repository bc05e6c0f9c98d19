"""`wlidd check --print`: the effective configuration as TOML that `wlidd` loads back to an equal Config.

Effective: every default filled in, the WLIDD_* environment applied, `~` expanded (what `load_config`
returns). Written by tomli-w from the validated model, walked field by field:

- a value that is None is left out (TOML has no null; every such field defaults to None);
- paths are strings, tuples are arrays, tables keep their order (the first token is the one served at
  /get_wif_token);
- file modes (`FileMode` fields) are octal strings ("0640"), as an operator writes them;
- durations are plain seconds (a float; every duration field takes a number of seconds).

Secrets are never printed; each is replaced by REDACTED, and the header says so:
- a `SecretStr` or `SecretBytes` field, whole (none exists today: keys and assertions are files, so the
  config names paths, not secrets);
- the password of a URL with userinfo (`https://user:<redacted>@host`: it stays a URL that validates);
- a string holding a private key, a JWT or a bearer token (one `wlidd.logs.scrub` would mask), whole —
  an on_change argument, say.
So a redacted config loads back equal except at those values.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Any, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo

from wlidd.config import FileMode
from wlidd.logs import scrub

REDACTED = "<redacted>"
_FILE_MODE = get_args(FileMode)[1:]  # the validator that marks a FileMode field


class _Walk:
    """One conversion: the TOML-ready document, and whether anything was redacted on the way."""

    def __init__(self) -> None:
        self.redacted = False

    def model(self, model: BaseModel) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if value is not None:
                document[name] = self.value(value, info)
        return document

    def value(self, value: object, info: FieldInfo | None = None) -> Any:
        if isinstance(value, BaseModel):
            return self.model(value)
        if isinstance(value, SecretStr | SecretBytes):
            self.redacted = True
            return REDACTED
        if isinstance(value, dict):
            return {str(key): self.value(item) for key, item in value.items() if item is not None}
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        if isinstance(value, PurePath):
            return self.text(os.fspath(value))
        if isinstance(value, str):
            return self.text(value)
        if info is not None and isinstance(value, int) and any(marker in _FILE_MODE for marker in info.metadata):
            return f"{value:04o}"
        return value

    def text(self, value: str) -> str:
        if scrub(value) != value:
            self.redacted = True
            return REDACTED
        if "://" in value:
            try:
                parts = urlsplit(value)
                password = parts.password
            except ValueError:
                return value
            if password:
                self.redacted = True
                userinfo, _, host = parts.netloc.rpartition("@")
                user = userinfo.partition(":")[0]
                return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))
        return value


def config_toml(config: BaseModel, *, source: str | None = None) -> str:
    """The effective configuration (see the module docstring) as a TOML document with a comment header;
    `source` names the file it was read from. Raises ModuleNotFoundError when tomli-w is not installed."""
    import tomli_w

    walk = _Walk()
    document = walk.model(config)
    header = [
        f"# wlidd effective configuration{f' of {source}' if source else ''}: defaults filled in, WLIDD_*",
        "# environment applied, ~ expanded; durations in seconds. `wlidd` loads it back as the same configuration.",
    ]
    if walk.redacted:
        header.append(f'# Secrets are shown as "{REDACTED}": put the real values back before using this file.')
    return "\n".join(header) + "\n\n" + tomli_w.dumps(document)
