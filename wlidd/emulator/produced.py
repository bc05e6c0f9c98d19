"""Every secret the emulator makes or is handed (private keys, access and ID tokens, client
assertions, subject tokens), remembered so tests can prove that none of them reaches a log line.

A secret is remembered by a 24-character window from its middle (for a PEM key, one from each body
line that is not also in the public key): random enough never to match by chance, short enough to be found inside a longer run of
text (a JSON-escaped log line, a repr, a truncated message).
"""

from __future__ import annotations

import base64
import re

WINDOW = 24
_windows: dict[str, str] = {}  # window → what kind of secret it came from
_RUN = re.compile(r"[A-Za-z0-9+/=_\-.~]{24,}")


def remember(kind: str, secret: str | bytes) -> None:
    text = secret.decode("ascii", "replace") if isinstance(secret, bytes) else secret
    if "-----BEGIN" not in text:
        _remember_window(kind, text, ())
        return
    public = _public_texts(text)
    for line in text.splitlines():
        if line and not line.startswith(("-----", "Proc-Type", "DEK-Info")):
            _remember_window(kind, line, public)


def _remember_window(kind: str, text: str, public: tuple[str, ...]) -> None:
    """The window nearest the middle of `text` that is not also public (a private key's PEM holds
    ASN.1 framing and the public key, which every certificate of that key shows too)."""
    middle = len(text) // 2 - WINDOW // 2
    for offset in sorted(range(len(text) - WINDOW + 1), key=lambda o: abs(o - middle)):
        window = text[offset : offset + WINDOW]
        if not any(window in p for p in public):
            _windows[window] = kind
            return


def _public_texts(pem: str) -> tuple[str, ...]:
    """The key's public half as base64 at each of the three alignments it can have inside a larger
    base64 text (a certificate): windows found there are not secret."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        return ()  # encrypted or not a key: every line counts
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return tuple(base64.b64encode(b"\0" * pad + spki).decode() for pad in range(3))


def find_leak(text: str) -> str | None:
    """The kind of the first remembered secret found in `text`, or None."""
    if not _windows:
        return None
    for match in _RUN.finditer(text):
        run = match.group()
        for i in range(len(run) - WINDOW + 1):
            kind = _windows.get(run[i : i + WINDOW])
            if kind is not None:
                return kind
    return None
