"""The sinks' tables: the credential files an identity writes (`identities.<name>.sinks`), the token
files a token source writes (`tokens.<name>.sinks`), and the users and groups who may read either."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from wlidd.config.values import Duration, ExpandedPath, FileMode, _check_id, _Strict

_MAX_READERS = 32  # POSIX ACL entries per kind; the xattr stays far below a file system's limit


class SinkReaders(_Strict):
    """Users and groups (by name or number) granted read access to a sink's files through POSIX ACLs,
    and read/traverse on its directory: no capability needed, the daemon owns the files."""

    users: tuple[Annotated[str | int, AfterValidator(_check_id)], ...] = Field(default=(), max_length=_MAX_READERS)
    groups: tuple[Annotated[str | int, AfterValidator(_check_id)], ...] = Field(default=(), max_length=_MAX_READERS)

    def __bool__(self) -> bool:
        return bool(self.users or self.groups)


class CredentialSinkConfig(_Strict):
    """Files for consumers that read credentials from disk, rewritten after every rotation and whenever they
    went stale (start, SIGHUP, a config change, the periodic re-read; wlidd.sinks.credentials.ensure_credentials).

    Each generation is published in one atomic step (Kubernetes' atomic writer: `<dir>/..data` re-pointed
    by rename, stable names `<dir>/<file> -> ..data/<file>`). One naming scheme per layout:

    - "files": cert.pem (chain), key.pem, bundle.pem, certificate_config.json ("workload" entry, read by
      Google's client libraries);
    - "spiffe-helper": svid.pem (chain), svid_key.pem, svid_bundle.pem (own trust domain's roots; the
      federated ones appended with include_federated_domains), spiffe-helper's documented names;
    - "spiffe-fs": credential-bundle.private-key.pem (key, then the chain without its trust anchor) and
      <trust domain>.spiffe-trust-bundle.pem per trust domain (the SPIFFE Filesystem Delivery draft).

    The removed layout "spiffe" is refused with what to use instead (its svid.pem held key and chain, a
    name spiffe-helper and `wlidd creds` use for the chain alone).
    """

    dir: ExpandedPath
    layout: Literal["files", "spiffe-helper", "spiffe-fs"] = "files"
    certificate_config: ExpandedPath | None = None  # files layout: default <dir>/certificate_config.json
    include_federated_domains: bool = False  # spiffe-helper layout: federated roots appended to svid_bundle.pem
    mode: FileMode = 0o644
    key_mode: FileMode = 0o600
    owner: str | int | None = None  # needs root or CAP_CHOWN; readers works without
    group: str | int | None = None
    readers: SinkReaders = Field(default_factory=SinkReaders)
    on_change: tuple[str, ...] = ()
    on_change_timeout: Duration = 30.0
    signal: str | None = None  # e.g. "SIGHUP", sent to the pid in pid_file after each rotation
    pid_file: ExpandedPath | None = None  # root's or wlidd's file in a directory only they can write

    @model_validator(mode="before")
    @classmethod
    def _removed_layout(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("layout") == "spiffe":
            raise ValueError(
                'layout "spiffe" was removed: its svid.pem held the key and the chain, while spiffe-helper (and'
                ' `wlidd creds`) use svid.pem for the chain alone. Use layout = "spiffe-fs" for key and chain in'
                " one file (credential-bundle.private-key.pem, <trust domain>.spiffe-trust-bundle.pem: the SPIFFE"
                ' Filesystem Delivery draft), or layout = "spiffe-helper" (svid.pem, svid_key.pem,'
                " svid_bundle.pem), and point the consumer at the new names"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> CredentialSinkConfig:
        import signal as signals

        if (self.signal is None) != (self.pid_file is None):
            raise ValueError("signal and pid_file go together")
        if self.signal is not None and not hasattr(signals, self.signal.upper()):
            raise ValueError(f"signal {self.signal!r} is not a signal name (e.g. SIGHUP, SIGUSR1)")
        if self.key_mode & 0o077:
            raise ValueError(
                f"key_mode {self.key_mode:04o} lets other users read the private key: 0600 or 0400;"
                " to hand the key to another user, name it in readers (or set owner)"
            )
        if self.certificate_config is not None and self.layout != "files":
            raise ValueError('certificate_config is only for layout "files"')
        if self.include_federated_domains and self.layout != "spiffe-helper":
            raise ValueError(
                'include_federated_domains is only for layout "spiffe-helper" ("spiffe-fs" writes every trust'
                " domain's bundle to its own file; \"files\" writes the own trust domain's only)"
            )
        config = self.certificate_config
        if config is not None and (config.name.startswith("..") or config.name in ("", ".")):
            raise ValueError(
                "certificate_config: a file name starting with '..' is reserved for the sink's generations"
            )
        return self


class SinkConfig(_Strict):
    path: ExpandedPath
    format: Literal["text", "json"] = "text"
    mode: FileMode = 0o600
    owner: str | int | None = None  # hand the file to the app's user instead of widening its mode (root only)
    group: str | int | None = None
    readers: SinkReaders = Field(default_factory=SinkReaders)  # POSIX ACL read access, no capability needed
    on_change: tuple[str, ...] = ()
    on_change_timeout: Duration = 30.0
