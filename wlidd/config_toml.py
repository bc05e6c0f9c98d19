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
- a URL's userinfo and query values (`https://<redacted>@host/p?key=<redacted>`: it stays a URL that
  validates);
- in an on_change command, the value after a flag that takes a secret (`-u`, `-H`, `--password`, ...)
  and `name=value` arguments whose name says secret (token, password, key, ...);
- a string holding a private key, a JWT or a bearer token (one `wlidd.logs.scrub` would mask), whole —
  an on_change argument, say.
So a redacted config loads back equal except at those values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any, get_args

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo

from wlidd.config import SECRET_WORDS, FileMode, redact_url
from wlidd.logs import scrub

REDACTED = "<redacted>"
# flags whose next argument is a credential (curl, wget, httpie, vault, kubectl spell them so)
SECRET_FLAGS = frozenset({"-u", "--user", "-H", "--header", "-p", "--password", "--token", "--pass", "-a", "--auth"})
_FILE_MODE = get_args(FileMode)[1:]  # the validator that marks a FileMode field


class _Walk:
    """One conversion: the TOML-ready document, and whether anything was redacted on the way."""

    def __init__(self) -> None:
        self.redacted = False

    def model(self, model: BaseModel) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if value is None:
                continue
            document[name] = self.argv(value) if name == "on_change" else self.value(value, info)
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
            redacted = redact_url(value, REDACTED)
            if redacted != value:
                self.redacted = True
            return redacted
        return value

    def argv(self, argv: Sequence[str]) -> list[str]:
        """An on_change command: a URL's secrets, the value after a flag that takes one (`-u user:pw`,
        `-H "X-Token: …"`, `--password x`), and `name=value` or `--name=value` whose name says secret are
        shown as REDACTED; the program and the other arguments as they are."""
        shown: list[str] = []
        after_flag = False
        for arg in argv:
            name = arg.lstrip("-").partition("=")[0].lower()
            if after_flag or ("://" not in arg and "=" in arg and any(word in name for word in SECRET_WORDS)):
                self.redacted = True
                shown.append(REDACTED)
            else:
                shown.append(self.text(arg))  # a URL: its userinfo and query values
            after_flag = arg in SECRET_FLAGS or (arg.startswith("-") and any(word in name for word in SECRET_WORDS))
        return shown


def config_toml(config: BaseModel, *, source: str | None = None) -> str:
    """The effective configuration (see the module docstring) as a TOML document with a comment header;
    `source` names the file it was read from. Raises ModuleNotFoundError when tomli-w is not installed."""
    import tomli_w

    walk = _Walk()
    document = walk.model(config)
    if source is not None:  # one comment line whatever the file's name holds (a newline would end it)
        source = source.encode("unicode_escape").decode("ascii")
    header = [
        f"# wlidd effective configuration{f' of {source}' if source else ''}: defaults filled in, WLIDD_*",
        "# environment applied, ~ expanded; durations in seconds. `wlidd` loads it back as the same configuration.",
    ]
    if walk.redacted:
        header.append(f'# Secrets are shown as "{REDACTED}": put the real values back before using this file.')
    return "\n".join(header) + "\n\n" + tomli_w.dumps(document)
