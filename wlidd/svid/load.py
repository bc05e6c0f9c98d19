"""Reading one identity's files as a set, and turning them into a validated Svid.
Long: every source layout's files and the mid-write retry policy, read as one set.

`CredentialSource.read()` is the only file I/O. Every source reads its set through one resolution:
each path is resolved to its real path (through a GCE symlink swap, a Kubernetes ``..data`` link, a
re-pointed ``current`` link), every file is read from its resolved path, and the paths are resolved
again afterwards; a set whose links moved while it was read is a rotation in progress
(`set_changed_while_read`), never a mixed set. `build_identity()` is pure. `load_identity()` retries
a refused set quietly while it may be caught mid-write (see `load_identity`), with an injectable sleep.

A federated trust domain's bundle that cannot be read or parsed does not refuse the set: it is
reported (`Identity.bundle_problems`) and the last good copy of that domain's bundle is kept.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, assert_never

import anyio.to_thread
from cryptography import x509

from wlidd.clock import Clock, utc_now
from wlidd.config import (
    CertificateConfigIdentityConfig,
    FilesIdentityConfig,
    GceIdentityConfig,
    IdentityConfig,
    read_certificate_config,
)
from wlidd.errors import ConfigError, NotRegularFile, RetryableSvidError, SvidError
from wlidd.svid.model import BundleProblem, BundleSet, Identity, TrustBundle
from wlidd.svid.parse import (
    MAX_FILE_BYTES,
    parse_bundle,
    parse_chain,
    parse_private_key,
    parse_trust_bundles_json,
)
from wlidd.svid.spiffeid import TrustDomain, spiffe_id_from_cert
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
    bundle_errors: tuple[tuple[str, SvidError], ...] = ()  # federated bundles that could not be read
    notes: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """Content fingerprint: decides "changed", since the GCE agent swaps the link even when nothing changed."""
        digest = hashlib.sha256()
        for part in (self.chain, self.key, self.own_bundle or b"", self.trust_bundles_json or b""):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        for trust_domain, data in self.extra_bundles:
            digest.update(trust_domain.encode() + b"\0" + data)
        for trust_domain, error in self.bundle_errors:
            digest.update(f"{trust_domain}\0{error.reason}".encode())
        return digest.hexdigest()


def read_regular_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """At most `limit` + 1 bytes of the regular file at `path` (symlinks followed), without blocking on
    anything else: opened with O_NONBLOCK (a FIFO opens at once, with or without a writer) and checked
    with fstat on the descriptor read from, so what is checked is what is read. NotRegularFile for
    anything but a regular file, else OSError as the kernel says."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"
            raise NotRegularFile(0, kind, str(path))
        os.set_blocking(fd, True)  # a regular file: reads never wait on a writer
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit + 1)
    finally:
        os.close(fd)


RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})  # "not now", not "bad file"


def _read(path: Path, what: str) -> bytes:
    try:
        data = read_regular_file(path)  # a FIFO or device would block the reading thread (and the watcher) forever
    except NotRegularFile as exc:
        reason = "file_is_directory" if exc.strerror == "is a directory" else "file_not_regular"
        raise SvidError(reason, f"{what} {path} {exc.strerror}") from None
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


def real_path(path: Path | str, *, attempts: int = 3) -> Path:
    """`path` with every symlink resolved (os.path.realpath), as far as it exists.

    realpath raises FileNotFoundError when a link vanishes between its lstat and its readlink (a writer
    that unlinks a link and then creates it again, as the GCE guest agent does): resolved again up to
    `attempts` times, then RetryableSvidError("file_missing") — a rotation in progress, not an error."""
    for _ in range(attempts):
        try:
            return Path(os.path.realpath(path))
        except OSError:
            continue
    raise RetryableSvidError("file_missing", f"{path} changed while it was resolved (a link being replaced)")


def _real_or_as_is(path: Path | str) -> Path:
    """real_path, or the absolute path as given when it cannot be resolved now (for watches, which are
    resolved again after the next event)."""
    try:
        return real_path(path)
    except RetryableSvidError:
        return Path(os.path.abspath(path))


def link_parents(path: Path, max_links: int = 40) -> list[Path]:
    """Directories whose entries decide what `path` resolves to, as real paths (symlinks resolved).

    The parent of `path`, the directory holding every symlink met while resolving it (a swapped
    ``..data`` or ``current`` link anywhere on the way), and the directory the final target is in.
    Directories that do not exist (yet) are included as far as they resolve: the caller waits for them.
    """
    found = [_real_or_as_is(path.parent)]
    pending = Path(os.path.abspath(path))
    for _ in range(max_links):
        current = Path(pending.parts[0])
        for index, part in enumerate(pending.parts[1:], start=1):
            step = current / part
            if step.is_symlink():
                found.append(_real_or_as_is(current))
                try:
                    target = Path(os.readlink(step))
                except OSError:
                    return list(dict.fromkeys(found))
                rest = pending.parts[index + 1 :]
                pending = Path(os.path.normpath(current / target)).joinpath(*rest)
                break
            current = step
        else:
            found.append(_real_or_as_is(pending.parent))
            return list(dict.fromkeys(found))
    return list(dict.fromkeys(found))


MAX_READS_PER_ATTEMPT = 25  # reads woken early by file events, per configured attempt, before a refusal stands

NOT_MID_WRITE = frozenset({"file_is_directory", "file_not_regular", "resources_exhausted"})
"""Refusals no writer produces by being caught half-way (a directory, the process out of descriptors):
reported at once. Every other refusal may be a set caught mid-write and is retried — a file that is
briefly unreadable too (`install -m 0644` creates it 0600 and chmods it after the copy)."""


class SourcePlan(Protocol):
    """Where one source's files are: one class per identity `source` (GcePlan, CertificateConfigPlan,
    FilesPlan), chosen by the config's type when its CredentialSource is made (`plan_for`)."""

    def roles(self) -> dict[str, Path]:
        """The files to read as one set, by role: "chain", "key", "bundle", "trust_bundles" (GCE, read
        when present), "bundle:<trust domain>" per federated bundle, "certificate_config" (resolved
        with the set, never read as part of it). Raises SvidError when the set cannot be located now
        (RetryableSvidError when that may be a rotation in progress)."""
        ...

    def watched(self) -> list[Path]:
        """The paths whose directories (and the links on the way to them) are watched for a new set;
        never raises (a set that cannot be located now is watched where it will appear)."""
        ...

    def describe(self) -> str:
        """The one path that names this source in the status (`/v1/status` "path")."""
        ...


def _bundle_roles(bundle: Path | None, bundles: Mapping[str, Path]) -> dict[str, Path]:
    roles = {"bundle": bundle} if bundle is not None else {}
    return roles | {f"bundle:{trust_domain}": path for trust_domain, path in sorted(bundles.items())}


@dataclass(frozen=True)
class GcePlan:
    """source = "gce": a directory holding certificates.pem, private_key.pem (or `key`) and
    ca_certificates.pem or trust_bundles.json (or `bundle`): the GCE guest agent's symlink swap, a GKE/CSI
    plain directory written by the Kubernetes atomic writer, or files renamed into it (SPECS.md §1.2)."""

    config: GceIdentityConfig

    def _paths(self) -> dict[str, Path]:
        base, cfg = self.config.gce_dir(), self.config
        roles = {"chain": base / GCE_CHAIN, "key": cfg.key or base / GCE_KEY}
        if cfg.bundle is None:
            roles |= {"trust_bundles": base / GCE_TRUST_BUNDLES, "bundle": base / GCE_CA}
        return roles | _bundle_roles(cfg.bundle, cfg.bundles)

    def roles(self) -> dict[str, Path]:
        directory = self.config.gce_dir()
        if not real_path(directory).is_dir():
            raise RetryableSvidError("file_missing", f"{directory} does not lead to a directory (yet)")
        return self._paths()

    def watched(self) -> list[Path]:
        return [*self._paths().values(), self.config.gce_dir()]  # the directory link's swap, its creation

    def describe(self) -> str:
        return str(self.config.gce_dir())


@dataclass(frozen=True)
class CertificateConfigPlan:
    """source = "certificate_config": the chain and key named by the "workload" entry of a
    certificate_config.json (SPECS.md §1.1, as Google's client libraries read it), read again with every set."""

    config: CertificateConfigIdentityConfig
    environ: Mapping[str, str] = field(repr=False)

    @property
    def path(self) -> Path:
        return self.config.certificate_config_path(self.environ)

    def roles(self) -> dict[str, Path]:
        path = self.path
        try:
            chain, key = read_certificate_config(path)
        except ConfigError as exc:
            if not path.exists():
                raise RetryableSvidError("file_missing", exc.message) from None
            raise SvidError("certificate_config_invalid", exc.message) from None
        roles = {"certificate_config": path, "chain": chain, "key": key}
        return roles | _bundle_roles(self.config.bundle, self.config.bundles)

    def watched(self) -> list[Path]:
        try:
            return list(self.roles().values())
        except SvidError:  # certificate_config.json missing or unreadable: watch it and the bundles
            return [self.path, *_bundle_roles(self.config.bundle, self.config.bundles).values()]

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class FilesPlan:
    """source = "files": the cert (chain), key and bundle paths as configured."""

    config: FilesIdentityConfig

    def roles(self) -> dict[str, Path]:
        roles = {"chain": self.config.cert, "key": self.config.key}
        return roles | _bundle_roles(self.config.bundle, self.config.bundles)

    def watched(self) -> list[Path]:
        return list(self.roles().values())

    def describe(self) -> str:
        return os.fspath(self.config.cert)


def plan_for(config: IdentityConfig, environ: Mapping[str, str]) -> SourcePlan:
    """The plan of `config`'s source, chosen by its type."""
    match config:
        case GceIdentityConfig():
            return GcePlan(config)
        case CertificateConfigIdentityConfig():
            return CertificateConfigPlan(config, environ)
        case FilesIdentityConfig():
            return FilesPlan(config)
    assert_never(config)


@dataclass(frozen=True)
class CredentialSource:
    """Where one identity's files are; `read()` returns them as one consistent set. Where the files are
    is its source's plan (`plan`, chosen by the config's type: GcePlan, CertificateConfigPlan, FilesPlan)."""

    name: str
    config: IdentityConfig
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)
    plan: SourcePlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", plan_for(self.config, self.environ))

    def describe(self) -> str:
        """The path that names this source (see SourcePlan.describe)."""
        return self.plan.describe()

    def watch_dirs(self) -> list[Path]:
        """Real directories whose events may mean a new set: every file's directory, each directory
        holding a link met on the way to it (a GCE swap, ``..data``, a re-pointed parent link) and the
        directory its target is in. Compared after every event burst and periodic re-read: when a
        link now leads elsewhere, the watches move (wlidd.watch)."""
        dirs: list[Path] = []
        for path in self.plan.watched():
            dirs.extend(link_parents(path))
        return list(dict.fromkeys(dirs))

    def read(self) -> CredentialFiles:
        """Read the set through one resolution (see the module docstring).

        Raises RetryableSvidError("file_missing" | "set_changed_while_read") when a rotation may be in
        progress, SvidError for a file that cannot be read (file_unreadable, file_is_directory,
        resources_exhausted, certificate_config_invalid, *_too_large). A federated bundle that cannot
        be read is not raised: it is returned in `bundle_errors`."""
        roles = self.plan.roles()
        resolved = {role: real_path(path) for role, path in roles.items()}
        if "trust_bundles" in resolved:
            if resolved["trust_bundles"].exists():
                resolved.pop("bundle")
            else:
                resolved.pop("trust_bundles")
        data: dict[str, bytes] = {}
        bundle_errors: list[tuple[str, SvidError]] = []
        for role, path in resolved.items():
            if role == "certificate_config":
                continue
            what = "bundle" if role.startswith("bundle") else role
            try:
                data[role] = _read(path, what)
            except SvidError as exc:
                if not role.startswith("bundle:"):
                    raise
                bundle_errors.append((role.removeprefix("bundle:"), exc))
        after = {role: real_path(roles[role]) for role in resolved}
        if after != resolved:
            moved = sorted(role for role in resolved if after[role] != resolved[role])
            raise RetryableSvidError(
                "set_changed_while_read",
                f"{', '.join(moved)} moved to another target while the set was read (a rotation in progress)",
            )
        chain_dir = resolved["chain"].parent
        return CredentialFiles(
            origin=str(chain_dir),
            chain=data["chain"],
            key=data["key"],
            own_bundle=data.get("bundle"),
            trust_bundles_json=data.get("trust_bundles"),
            extra_bundles=tuple((r.removeprefix("bundle:"), d) for r, d in data.items() if r.startswith("bundle:")),
            bundle_errors=tuple(bundle_errors),
            notes=_key_mode_note(resolved["key"]),
        )


MAX_BUNDLE_PROBLEMS = 64  # federated domains reported per set; the rest are counted in the last entry's message


# long: the checks of one credential set in order, each refusal with its reason
def build_identity(
    files: CredentialFiles,
    now: dt.datetime,
    *,
    trust_domain: str | None = None,
    previous: BundleSet | None = None,
) -> Identity:
    """Parse and validate one credential set (pure): an Identity, or SvidError with the reason.

    The own trust domain's bundle must be good (the chain is validated against it). A federated
    domain's bundle that is missing or damaged (a file under `bundles`, one entry of
    trust_bundles.json) is reported in `Identity.bundle_problems`, and the copy in `previous` (the
    bundles of the state served so far) is kept for that domain."""
    key = parse_private_key(files.key)
    chain = parse_chain(files.chain)
    own_td = TrustDomain(trust_domain) if trust_domain else spiffe_id_from_cert(chain[0]).trust_domain
    authorities: dict[TrustDomain, list[x509.Certificate]] = {}
    broken: dict[str, SvidError] = {}
    if files.trust_bundles_json is not None:
        parsed, errors = parse_trust_bundles_json(files.trust_bundles_json)
        for td, certs in parsed.items():
            authorities.setdefault(td, []).extend(certs)
        broken.update(errors)
    if files.own_bundle is not None:
        authorities.setdefault(own_td, []).extend(parse_bundle(files.own_bundle, own_td))
    for name, data in files.extra_bundles:
        try:
            certs = parse_bundle(data, name)
        except SvidError as exc:
            broken[name] = exc
            continue
        authorities.setdefault(TrustDomain(name), []).extend(certs)
    broken.update(files.bundle_errors)
    if own_td in broken:
        raise broken[own_td]
    problems: list[BundleProblem] = []
    for name, refusal in sorted(broken.items()):
        kept = previous.get(name) if previous is not None else None
        if kept is not None and name not in authorities:
            authorities[kept.trust_domain] = list(kept.authorities)
        problems.append(BundleProblem(name, refusal.reason, refusal.message, kept is not None))
    if len(problems) > MAX_BUNDLE_PROBLEMS:
        rest = len(problems) - MAX_BUNDLE_PROBLEMS + 1
        last = problems[MAX_BUNDLE_PROBLEMS - 1]
        problems[MAX_BUNDLE_PROBLEMS - 1] = BundleProblem(
            last.trust_domain, last.reason, f"{last.message} (and {rest - 1} more domains)", last.kept
        )
        del problems[MAX_BUNDLE_PROBLEMS:]
    bundles = BundleSet({td: TrustBundle(td, tuple(dict.fromkeys(certs))) for td, certs in authorities.items()})
    try:
        svid = validate_svid(chain, key, bundles, now, trust_domain=trust_domain)
    except (ValueError, TypeError) as exc:  # a damaged field the parser only reads on use
        raise SvidError("chain_bad_certificate", f"chain cannot be validated: {exc}") from None
    return Identity(
        svid=svid,
        bundles=bundles,
        fingerprint=files.fingerprint(),
        origin=files.origin,
        notes=files.notes,
        bundle_problems=tuple(problems),
    )


Sleep = Callable[[float], Awaitable[bool | None]]


# long: the mid-write retry policy: its docstring and its one loop (settle window, read caps) together
async def load_identity(
    source: CredentialSource,
    *,
    now: Clock = utc_now,
    sleep: Sleep = anyio.sleep,
    attempts: int | None = None,
    delay: float | None = None,
    on_retry: Callable[[int, SvidError], None] | None = None,
    current: Identity | None = None,
) -> Identity:
    """Read and validate, retrying quietly while the set may be caught mid-write.

    A writer that truncates and rewrites, renames files in one at a time or swaps links leaves a set
    that is briefly missing a file, damaged (half a PEM), mixed (a key not matching the leaf, a chain
    from another generation) or re-pointed while read. Every refusal but those in NOT_MID_WRITE is
    therefore retried for up to (`attempts` - 1) × `delay` seconds (config `mismatch_retries`,
    `mismatch_retry_delay`: 15 s by default), read again after each `delay` or at the next file event
    if that comes first; a set with federated bundle problems is retried the same way before it is
    accepted with them. Retrying stops early, and the refusal stands, once the same content has failed
    the same way for a full `delay`: the files are as their writer means them to be.

    `sleep(seconds)` may return True when it was cut short by a file event; only the time that really
    passed then counts, so unrelated events in a watched directory cannot use up the retries (reads are
    capped at MAX_READS_PER_ATTEMPT × `attempts` all the same). File reads and crypto run in a worker
    thread; the event loop never blocks on them. Raises SvidError (the last refusal).

    `current` is the identity served now: its federated bundles are kept for domains whose bundle broke,
    files with its fingerprint are not parsed again while it is valid (it is returned as is: events in a
    busy directory cost a read, not a validation), and federated problems it already has are accepted
    at once (only a new problem may be a bundle caught mid-write).
    """
    attempts = attempts if attempts is not None else source.config.mismatch_retries
    delay = delay if delay is not None else source.config.mismatch_retry_delay
    trust_domain = source.config.trust_domain

    previous = current.bundles if current is not None else None
    known_problems = {(p.trust_domain, p.reason) for p in current.bundle_problems} if current is not None else set()

    def attempt_once() -> tuple[Identity | None, SvidError | None, str]:
        try:
            files = source.read()
        except SvidError as exc:
            return None, exc, f"{exc.reason}\0{exc.message}"
        fingerprint = files.fingerprint()
        if current is not None and current.fingerprint == fingerprint and current.svid.is_valid_at(now()):
            return current, None, ""
        try:
            identity = build_identity(files, now(), trust_domain=trust_domain, previous=previous)
        except SvidError as exc:
            return None, exc, f"{exc.reason}\0{fingerprint}"
        return identity, None, f"bundles\0{fingerprint}"

    window = (attempts - 1) * delay  # how long a set may take to settle
    waited = waited_same = 0.0  # seconds since the first refusal; since this content was first read
    previous_key: str | None = None
    for attempt in range(1, attempts * MAX_READS_PER_ATTEMPT + 1):
        identity, error, key = await anyio.to_thread.run_sync(attempt_once)
        if identity is not None and {(p.trust_domain, p.reason) for p in identity.bundle_problems} <= known_problems:
            return identity
        if key != previous_key:
            waited_same = 0.0
        settled = (
            waited >= window
            or waited_same >= delay
            or attempt == attempts * MAX_READS_PER_ATTEMPT
            or (error is not None and error.reason in NOT_MID_WRITE)
        )
        if settled:
            if error is not None:
                raise error
            assert identity is not None
            return identity
        if on_retry is not None:
            if error is None:
                assert identity is not None
                first = identity.bundle_problems[0]
                error = SvidError(first.reason, f"bundle of {first.trust_domain}: {first.message}")
            on_retry(attempt, error)
        started = anyio.current_time()
        woken = await sleep(min(delay, window - waited))
        slept = min(delay, window - waited) if not woken else anyio.current_time() - started
        waited += slept
        waited_same += slept
        previous_key = key
    raise AssertionError("unreachable")
