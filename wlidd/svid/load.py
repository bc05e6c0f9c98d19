"""Reading one identity's files as a set, and turning them into a validated Svid.

`CredentialSource.read()` is the only file I/O: for GCE it resolves the swapped symlink once and
reads every file from the resolved contents directory, so chain, key and bundle come from one
rotation. `build_identity()` is pure. `load_identity()` retries the pair when a rotation may be half
done (a missing file, a key that does not match the leaf), with an injectable sleep.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import anyio.to_thread

from wlidd.config import IdentityConfig, read_certificate_config
from wlidd.errors import ConfigError, RetryableSvidError, SvidError
from wlidd.svid.model import BundleSet, Svid, TrustBundle
from wlidd.svid.parse import (
    MAX_FILE_BYTES,
    parse_bundle,
    parse_chain,
    parse_private_key,
    parse_trust_bundles_json,
)
from wlidd.svid.spiffeid import spiffe_id_from_cert
from wlidd.svid.validate import validate_svid

GCE_CHAIN = "certificates.pem"
GCE_KEY = "private_key.pem"
GCE_CA = "ca_certificates.pem"
GCE_TRUST_BUNDLES = "trust_bundles.json"


@dataclass(frozen=True)
class CredentialFiles:
    """The raw bytes of one credential set, read together from one place."""

    origin: str
    chain: bytes
    key: bytes = field(repr=False)
    own_bundle: bytes | None = None
    trust_bundles_json: bytes | None = None
    extra_bundles: tuple[tuple[str, bytes], ...] = ()
    notes: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """Content fingerprint: decides "changed", since the GCE agent swaps the link even when nothing changed."""
        digest = hashlib.sha256()
        for part in (self.chain, self.key, self.own_bundle or b"", self.trust_bundles_json or b""):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        for trust_domain, data in self.extra_bundles:
            digest.update(trust_domain.encode() + b"\0" + data)
        return digest.hexdigest()


RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})  # "not now", not "bad file"


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise RetryableSvidError("file_missing", f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise SvidError("file_is_directory", f"{what} {path} is a directory") from None
    except PermissionError:
        raise SvidError("file_unreadable", f"{what} {path} is not readable (permission denied)") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise RetryableSvidError("file_missing", f"{what} {path} cannot be reached: {exc.strerror}") from None
        if exc.errno in RESOURCE_ERRNOS:  # the process, not the file: a retry once descriptors are free reads it
            raise SvidError("resources_exhausted", f"{what} {path} cannot be opened now: {exc.strerror}") from None
        raise SvidError("file_unreadable", f"{what} {path} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise SvidError(f"{what.replace(' ', '_')}_too_large", f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def _key_mode_note(path: Path) -> tuple[str, ...]:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return ()
    if mode & 0o077:
        return (
            f"private key file has mode {mode:04o} (readable beyond its owner); the GCE guest agent "
            "writes it this way: wlidd reads it and never copies it to disk, but restrict who can log in",
        )
    return ()


def link_parents(path: Path, max_links: int = 40) -> list[Path]:
    """Directories whose entries decide what `path` resolves to.

    The parent of `path`, the directory holding every symlink met while resolving it (a swapped
    ``..data`` or ``current`` link anywhere on the way), and the parent of the final target.
    """
    found = [path.parent]
    pending = Path(os.path.abspath(path))
    for _ in range(max_links):
        current = Path(pending.parts[0])
        for index, part in enumerate(pending.parts[1:], start=1):
            step = current / part
            if step.is_symlink():
                found.append(current)
                try:
                    target = Path(os.readlink(step))
                except OSError:
                    return found
                rest = pending.parts[index + 1 :]
                pending = Path(os.path.normpath(current / target)).joinpath(*rest)
                break
            current = step
        else:
            found.append(pending.parent)
            return found
    return found


@dataclass(frozen=True)
class CredentialSource:
    """Where one identity's files are; `read()` returns them as one consistent set."""

    name: str
    config: IdentityConfig
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    def watch_dirs(self) -> list[Path]:
        """Directories whose events may mean a new set (parents, since links and files are replaced)."""
        cfg = self.config
        paths: list[Path] = []
        if cfg.source == "gce":
            paths.append(cfg.gce_dir())
        elif cfg.source == "certificate_config":
            config_path = cfg.certificate_config_path(self.environ)
            paths.append(config_path)
            with contextlib.suppress(ConfigError):
                paths.extend(read_certificate_config(config_path))
        else:
            assert cfg.cert is not None and cfg.key is not None
            paths += [cfg.cert, cfg.key]
        paths += [p for p in (cfg.key if cfg.source == "gce" else None, cfg.bundle) if p is not None]
        paths += list(cfg.bundles.values())
        stable: list[Path] = []
        reached: list[Path] = []  # directories only reached through a symlink (they may vanish on a swap)
        for path in paths:
            parents = link_parents(path)
            through_link = len(parents) > 2 or (len(parents) == 2 and parents[1] != path.parent)
            for index, candidate in enumerate(parents):
                target = reached if through_link and index == len(parents) - 1 else stable
                if candidate not in target:
                    target.append(candidate)
        # A symlink target inside a directory already watched for its link swap needs no watch of its
        # own (a Kubernetes ..2026_x dir, a GCE contents dir): it is replaced, not edited.
        extra = [d for d in reached if d not in stable and not any(s in d.parents for s in stable)]
        return stable + extra

    def read(self) -> CredentialFiles:
        cfg = self.config
        extra = tuple((td, _read(path, "bundle")) for td, path in sorted(cfg.bundles.items()))
        own_bundle = _read(cfg.bundle, "bundle") if cfg.bundle is not None else None
        if cfg.source == "gce":
            link = cfg.gce_dir()
            resolved = Path(os.path.realpath(link))
            if not resolved.is_dir():
                raise RetryableSvidError("file_missing", f"{link} does not lead to a directory (yet)")
            chain = _read(resolved / GCE_CHAIN, "chain")
            key_path = cfg.key or resolved / GCE_KEY
            key = _read(key_path, "key")
            trust_bundles = None
            if own_bundle is None:
                if (resolved / GCE_TRUST_BUNDLES).exists():
                    trust_bundles = _read(resolved / GCE_TRUST_BUNDLES, "trust_bundles")
                else:
                    own_bundle = _read(resolved / GCE_CA, "bundle")
            return CredentialFiles(
                origin=str(resolved),
                chain=chain,
                key=key,
                own_bundle=own_bundle,
                trust_bundles_json=trust_bundles,
                extra_bundles=extra,
                notes=_key_mode_note(key_path),
            )
        if cfg.source == "certificate_config":
            config_path = cfg.certificate_config_path(self.environ)
            try:
                cert_path, key_path = read_certificate_config(config_path)
            except ConfigError as exc:
                if not config_path.exists():
                    raise RetryableSvidError("file_missing", exc.message) from None
                raise SvidError("certificate_config_invalid", exc.message) from None
        else:
            assert cfg.cert is not None and cfg.key is not None
            cert_path, key_path = cfg.cert, cfg.key
        return CredentialFiles(
            origin=str(cert_path.parent),
            chain=_read(cert_path, "chain"),
            key=_read(key_path, "key"),
            own_bundle=own_bundle,
            extra_bundles=extra,
            notes=_key_mode_note(key_path),
        )


@dataclass(frozen=True)
class Identity:
    """A validated identity: the Svid, the bundles of every configured trust domain, and its origin."""

    svid: Svid
    bundles: BundleSet
    fingerprint: str
    origin: str
    notes: tuple[str, ...] = ()

    @property
    def own_bundle(self) -> TrustBundle:
        bundle = self.bundles.get(self.svid.spiffe_id.trust_domain)
        assert bundle is not None
        return bundle


def build_identity(files: CredentialFiles, now: dt.datetime, *, trust_domain: str | None = None) -> Identity:
    """Parse and validate one credential set (pure): an Identity or SvidError."""
    key = parse_private_key(files.key)
    chain = parse_chain(files.chain)
    own_td = trust_domain or spiffe_id_from_cert(chain[0]).trust_domain
    authorities: dict[str, list[object]] = {}
    if files.trust_bundles_json is not None:
        for td, certs in parse_trust_bundles_json(files.trust_bundles_json).items():
            authorities.setdefault(td, []).extend(certs)
    if files.own_bundle is not None:
        authorities.setdefault(own_td, []).extend(parse_bundle(files.own_bundle, own_td))
    for td, data in files.extra_bundles:
        authorities.setdefault(td, []).extend(parse_bundle(data, td))
    bundles = BundleSet(
        {
            td: TrustBundle(td, tuple(dict.fromkeys(certs)))  # type: ignore[arg-type]
            for td, certs in authorities.items()
        }
    )
    try:
        svid = validate_svid(chain, key, bundles, now, trust_domain=trust_domain)
    except (ValueError, TypeError) as exc:  # a damaged field the parser only reads on use
        raise SvidError("chain_bad_certificate", f"chain cannot be validated: {exc}") from None
    return Identity(svid=svid, bundles=bundles, fingerprint=files.fingerprint(), origin=files.origin, notes=files.notes)


Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@overload
def iso_z(value: dt.datetime) -> str: ...
@overload
def iso_z(value: None) -> None: ...
def iso_z(value: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC with a 'Z' suffix, as every wlidd answer and file writes times."""
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value is not None else None


async def load_identity(
    source: CredentialSource,
    *,
    now: Clock = utc_now,
    sleep: Sleep = anyio.sleep,
    attempts: int | None = None,
    delay: float | None = None,
    on_retry: Callable[[int, SvidError], None] | None = None,
) -> Identity:
    """Read and validate, retrying a missing file or key mismatch (rotation in progress).

    File reads and crypto run in a worker thread; the event loop never blocks on them.
    """
    attempts = attempts if attempts is not None else source.config.mismatch_retries
    delay = delay if delay is not None else source.config.mismatch_retry_delay
    trust_domain = source.config.trust_domain
    for attempt in range(1, attempts + 1):
        try:
            return await anyio.to_thread.run_sync(
                lambda: build_identity(source.read(), now(), trust_domain=trust_domain)
            )
        except RetryableSvidError as exc:
            if attempt == attempts:
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            await sleep(delay)
    raise AssertionError("unreachable")
