"""Writes credential sets exactly as the GCE guest agent does (SPECS.md §1.2).

Current writer (google-guest-agent mwlid): files into a new ``workload-spiffe-contents-<time>`` dir,
``symlink(newdir, temp)``, ``unlink(live)``, ``rename(temp, live)``, ``rm -rf`` the old dir — which
leaves a short window with no live link. Older writer: the same without the unlink (atomic swap).
Files 0644 (the key included), dirs 0755, plain writes without fsync.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

LINK_NAME = "workload-spiffe-credentials"


class GceCredentialWriter:
    """The guest agent's writer, pointed at a directory standing in for ``/run/secrets``."""

    def __init__(
        self, secrets_dir: Path, *, atomic: bool = False, clock: Callable[[], dt.datetime] | None = None
    ) -> None:
        self.secrets_dir = secrets_dir
        self.atomic = atomic
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.secrets_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._counter = 0

    @property
    def link(self) -> Path:
        return self.secrets_dir / LINK_NAME

    def _stamp(self) -> str:
        self._counter += 1
        # RFC 3339 like the agent; a counter keeps names unique when rotations are sub-second.
        return self.clock().strftime("%Y-%m-%dT%H:%M:%SZ") + f".{self._counter:06d}"

    def new_contents_dir(self) -> Path:
        path = self.secrets_dir / f"workload-spiffe-contents-{self._stamp()}"
        path.mkdir(mode=0o755)
        return path

    @staticmethod
    def write_files(directory: Path, files: Mapping[str, bytes]) -> None:
        for name, data in files.items():
            target = directory / name
            with open(target, "wb") as handle:  # truncate-and-write, no fsync, like the agent
                handle.write(data)
            os.chmod(target, 0o644)

    def swap_to(self, new_dir: Path) -> None:
        """Point the live link at `new_dir` the way the agent does, then delete the old dir at once."""
        old_target = os.readlink(self.link) if self.link.is_symlink() else None
        temp = self.secrets_dir / f"workload-spiffe-symlink-{self._stamp()}"
        os.symlink(new_dir, temp)
        if not self.atomic and self.link.is_symlink():
            os.unlink(self.link)
        os.rename(temp, self.link)
        if old_target and Path(old_target) != new_dir:
            shutil.rmtree(old_target, ignore_errors=True)

    def rotate(self, files: Mapping[str, bytes]) -> Path:
        """One full rotation: new contents dir with `files`, then the swap."""
        new_dir = self.new_contents_dir()
        self.write_files(new_dir, files)
        self.swap_to(new_dir)
        return new_dir


def gce_files(
    chain_pem: bytes, key_pem: bytes, ca_pem: bytes | None = None, trust_bundles_json: bytes | None = None
) -> dict[str, bytes]:
    """The file set of one rotation: MDS source (ca_certificates.pem) or gRPC source (trust_bundles.json)."""
    files = {"certificates.pem": chain_pem, "private_key.pem": key_pem}
    if ca_pem is not None:
        files["ca_certificates.pem"] = ca_pem
        files["config_status"] = b'{"status":"Ok"}'
    if trust_bundles_json is not None:
        files["trust_bundles.json"] = trust_bundles_json
    return files
