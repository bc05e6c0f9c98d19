"""`CredentialSource`: one identity's files, read as one consistent set through one resolution.

Each path is resolved to its real path (through a GCE symlink swap, a Kubernetes ``..data`` link, a
re-pointed ``current`` link), every file is read from its resolved path, and the paths are resolved
again afterwards; a set whose links moved while it was read is a rotation in progress
(`set_changed_while_read`), never a mixed set. A federated bundle that cannot be read is returned in
`CredentialFiles.bundle_errors`, not raised.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wlidd.config import IdentityConfig
from wlidd.errors import RetryableSvidError, SvidError
from wlidd.svid.credential_set import CredentialFiles
from wlidd.svid.load.files import link_parents, read_file, real_path
from wlidd.svid.load.plans import SourcePlan, plan_for


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
                data[role] = read_file(path, what)
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
