"""One file of a credential set, read without blocking on anything but a regular file, and the paths it is
reached through (symlinks resolved, the directories whose links decide where it leads).

Every refusal is an SvidError with its stable reason (`read_file`); a file missing or a link on the way
being replaced is a RetryableSvidError (a rotation may be in progress).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from wlidd.errors import NotRegularFile, RetryableSvidError, SvidError
from wlidd.svid.parse import MAX_FILE_BYTES


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


def read_file(path: Path, what: str) -> bytes:
    """The bytes of the regular file at `path` (`what` names its role in messages), at most MAX_FILE_BYTES:
    each refusal an SvidError with its reason, RetryableSvidError("file_missing") while it may be a rotation."""
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
