"""`wlidd check` for token sources: the files a source reads at run time, read and parsed now.

A token source reads `ca_file` (the CA certificates it verifies STS, IAM and Entra ID against) and, for
entra-sts with its own signer, `entra.cert` and `entra.key` only when it first calls its upstream: a
missing or damaged file would otherwise pass `wlidd check` and fail at every refresh. Each problem is
one line naming the config key and the path; nothing here is secret (a key's content never appears).

Only regular files are read (`read_regular_file`): a FIFO, a device or a socket configured as one of these
files would block open() or read() forever (the daemon's event loop at its first fetch, `wlidd check`
before it), so it is refused as "is not a regular file" without waiting for a writer.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from wlidd.config import Config, EntraStsTokenConfig
from wlidd.errors import NotRegularFile, SvidError
from wlidd.svid.load.files import read_regular_file
from wlidd.svid.parse import parse_chain, parse_private_key


def token_problems(config: Config) -> list[str]:
    """One line per token source file that cannot be used: `tokens.<name>.<key>: <path>: <reason>`."""
    problems: list[str] = []
    for name, token in sorted(config.tokens.items()):
        where = f"tokens.{name}"
        if token.ca_file is not None:
            problems += [f"{where}.ca_file: {token.ca_file}: {reason}" for reason in _ca_file_problems(token.ca_file)]
        if isinstance(token, EntraStsTokenConfig) and token.entra.cert is not None and token.entra.key is not None:
            problems += [f"{where}.entra.{reason}" for reason in _signer_problems(token.entra.cert, token.entra.key)]
    return problems


def _read(path: Path) -> bytes:
    """At most MAX_FILE_BYTES + 1 bytes of `path`, a regular file; OSError as the kernel says."""
    return read_regular_file(path)


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, NotRegularFile):
        return exc.strerror or "is not a regular file"
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, PermissionError):
        return "is not readable (permission denied)"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return f"cannot be read: {exc.strerror or exc}"


def _ca_file_problems(path: Path) -> list[str]:
    """Why `path` cannot serve as the upstream CA file (the way the token flows load it:
    ssl.create_default_context(cafile=…)), or nothing."""
    try:
        _read(path)
    except OSError as exc:
        return [_os_reason(exc)]
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        return [f"holds no usable CA certificate (OpenSSL: {exc.reason or exc})"]
    except OSError as exc:
        return [_os_reason(exc)]
    return []


def _signer_problems(cert_path: Path, key_path: Path) -> list[str]:
    """Why entra.cert / entra.key cannot sign Entra ID client assertions (an RSA key, its certificate
    first in the chain, the two matching: Microsoft identity platform, certificate credentials), or
    nothing. Each reason starts with the key's name (cert: / key:)."""
    problems: list[str] = []
    key = leaf = None
    try:
        key = parse_private_key(_read(key_path))
    except OSError as exc:
        problems.append(f"key: {key_path}: {_os_reason(exc)}")
    except SvidError as exc:
        problems.append(f"key: {key_path}: {exc.reason}: {exc.message}")
    try:
        leaf = parse_chain(_read(cert_path))[0]
    except OSError as exc:
        problems.append(f"cert: {cert_path}: {_os_reason(exc)}")
    except SvidError as exc:
        problems.append(f"cert: {cert_path}: {exc.reason}: {exc.message}")
    if key is not None and not isinstance(key, rsa.RSAPrivateKey):
        problems.append(f"key: {key_path}: Entra ID client assertions need an RSA key (PS256/RS256)")
    elif key is not None and leaf is not None and key.public_key() != leaf.public_key():
        problems.append(f"key: {key_path}: does not match the certificate in {cert_path}")
    return problems
