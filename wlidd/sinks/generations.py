"""publish_generation: a credential sink's files published as one generation in one atomic step, following
Kubernetes' atomic writer (pkg/volume/util/atomic_writer.go, Write), with a spare generation prepared
ahead so the first event a watcher of the directory sees is the rename of `..data`; plain files an older
wlidd wrote carried into a generation of their own; leftovers of a crash swept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from wlidd import posix_acl
from wlidd.errors import InvalidValue
from wlidd.logs import get_logger
from wlidd.safedir import SinkRefused, open_dir, trusted_uids
from wlidd.sinks.access import CAP_FOWNER, Readers, grant_directory, has_capability, held_by_other
from wlidd.sinks.files import ADOPT_LIMIT, sweep_once
from wlidd.sinks.generation_dirs import (
    DATA_LINK,
    DATA_TMP,
    GENERATION,
    Entry,
    current_generation,
    empty_generation,
    fill_generation,
    generation_holds,
    generation_names,
    is_data_link,
    link_data_tmp,
    make_links,
    new_generation_dir,
    remove_generation,
    rename_data,
    spare_generation,
    swap_data,
    write_generation,
)
from wlidd.sinks.layouts import SinkFile
from wlidd.sinks.locks import directory_lock
from wlidd.sinks.problems import reason

log = get_logger("wlidd.sinks")


def publish_generation(
    directory: Path, files: Sequence[SinkFile], uid: int = -1, gid: int = -1, *, readers: Readers | None = None
) -> bool:
    """Make `directory` hold `files` (mode, owner `uid`/`gid` unless -1, read access for `readers` through
    a POSIX ACL) as one generation, published in one atomic step. True when something was written; False
    when the directory already held exactly that (the check is cheap: a readlink, the files' stat, content
    and ACL), so calling this on every SIGHUP or timer tick rewrites only what is stale or missing.

    The steps follow Kubernetes' atomic writer (pkg/volume/util/atomic_writer.go, Write):

    1. the current generation is the target of `<dir>/..data`; if it holds these files and every stable
       name `<dir>/<file>` is the link `..data/<file>`, nothing is done;
    2. a new hidden directory `..<UTC time>.<random>` (mode 0755, its default ACL removed) gets every file,
       each created O_EXCL with its mode, ACL and owner set before its content, and fsynced; then the
       directory is fsynced. A failure here removes it and changes nothing a reader sees;
    3. the link `..data_tmp -> ..<new>` is made and renamed over `..data`: the one atomic step;
    4. missing stable names are created as links into `..data` (a temp link renamed into place, which also
       replaces a plain file an older wlidd left: before the first generation such files are carried into
       a generation of their own, so no name changes content while it becomes a link);
    5. stable links of names the new generation no longer has are removed, then the old generation.

    One departure from that order: the directory and the `..data_tmp` link of the *next* generation are
    made, empty, at the end of each publication (the "spare"), and step 2 fills it. Files written inside
    it raise no event in `<dir>` (inotify does not recurse), so the first event a watcher of `<dir>` gets
    for a rotation is the rename of `..data_tmp` over `..data` itself: a consumer that reloads on any
    first event then reads the new generation whole, not the old one while it is being replaced. Without
    a spare (the first write, after a crash or a wiped directory) the steps run in Kubernetes' order.

    A reader that resolves `..data` once and reads every file through that generation, or that reloads on
    the IN_MOVED_TO of `..data` (Envoy's watched_directory), never sees a key from one generation with a
    chain from another. Leftovers of a crash (`..<generation>` directories neither `..data` nor the spare
    `..data_tmp` leads to, a dangling `..data_tmp`, temp links) are removed when root or wlidd's user
    owns them.

    Raises SinkRefused (a directory on the way others could change, see open_dir; a name another user
    holds in a sticky directory), IsADirectoryError (a directory at a stable name), or another OSError
    whose filename is the stable path of the file concerned; in each case the published files are left
    as they were. EOPNOTSUPP: a file system without POSIX ACLs, with `readers`. InvalidValue
    ("sink_file_name"): no files, or two of one name.
    """
    names = [f.name for f in files]
    if len(set(names)) != len(names) or not names:
        raise InvalidValue("sink_file_name", f"a generation needs distinct file names, not {names}")
    dir_fd = open_dir(directory, create=True)
    try:
        with directory_lock(dir_fd, directory):
            return _publish_generation(dir_fd, directory, files, names, uid, gid, readers)
    finally:
        os.close(dir_fd)


def _publish_generation(
    dir_fd: int,
    directory: Path,
    files: Sequence[SinkFile],
    names: list[str],
    uid: int,
    gid: int,
    readers: Readers | None,
) -> bool:
    """publish_generation's steps, with the directory open and locked."""
    shown = str(directory)
    if readers:
        grant_directory(dir_fd, readers, shown)
    acls: dict[int, bytes] = {}
    for f in files:
        if readers and f.mode not in acls:
            acls[f.mode] = posix_acl.file_acl(f.mode, readers.users, readers.groups)
    entries = [Entry(f, uid, gid, acls.get(f.mode)) for f in sorted(files, key=lambda f: not f.secret)]
    current = current_generation(dir_fd)
    spare = spare_generation(dir_fd, current)
    _sweep_generations(dir_fd, current, spare, shown)
    for name in names:
        sweep_once(dir_fd, name, shown)
    fresh = current is not None and generation_holds(dir_fd, current, entries)
    if fresh and all(is_data_link(dir_fd, name) for name in names):
        if spare is None:  # up to date; make the next rotation's first event its ..data rename
            _prepare_spare(dir_fd, directory)
        return False
    _check_names(dir_fd, directory, [*names, DATA_LINK, DATA_TMP])
    old = current
    if not fresh:
        if current is None and (adopted := _adopt_plain_files(dir_fd, directory, names)) is not None:
            old, spare = adopted, None  # its swap used ..data_tmp: the spare is a leftover now
        _publish(dir_fd, directory, entries, spare)
    make_links(dir_fd, directory, names)
    if not fresh and old is not None:
        for name in generation_names(dir_fd, old):
            if name not in names and is_data_link(dir_fd, name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
        if not remove_generation(dir_fd, old):
            log.warning("old credential generation not removed", dir=shown, generation=old)
    if not fresh:
        _prepare_spare(dir_fd, directory)
    os.fsync(dir_fd)
    return True


def _check_names(dir_fd: int, directory: Path, names: Sequence[str]) -> None:
    """Refuse, before anything is written, a name the publication would fail on: a directory at a stable
    name or at ..data, or a name another user holds in a sticky directory when this process may not
    replace it (no CAP_FOWNER)."""
    parent = os.fstat(dir_fd)
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        held = held_by_other(st, parent)
        path = directory / name
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(
                errno.EISDIR, f"{path} is a directory" + (f" that {held}" if held else "") + "; nothing written"
            )
        if held and not has_capability(CAP_FOWNER):
            raise SinkRefused(f"{path} {held}; nothing written (choose a directory only root or wlidd can write)")


def _publish(dir_fd: int, directory: Path, entries: Sequence[Entry], spare: str | None) -> None:
    """Steps 2 and 3: fill the spare (or a new generation) with `entries`, then rename `..data_tmp` over
    `..data`. On failure the new generation (and its ..data_tmp) is removed and the error raised."""
    if spare is None:
        new = write_generation(dir_fd, directory, entries)
        try:
            link_data_tmp(dir_fd, directory, new)
            rename_data(dir_fd, directory)
        except BaseException:
            remove_generation(dir_fd, new)
            raise
        return
    try:
        fill_generation(dir_fd, directory, spare, entries)
    except BaseException:
        if not empty_generation(dir_fd, spare):  # kept empty for the next try: the directory is as it was
            with contextlib.suppress(OSError):
                os.unlink(DATA_TMP, dir_fd=dir_fd)
            remove_generation(dir_fd, spare)
        raise
    try:
        rename_data(dir_fd, directory)
    except BaseException:
        remove_generation(dir_fd, spare)
        raise


def _prepare_spare(dir_fd: int, directory: Path) -> None:
    """Make the next generation's directory, empty, and `..data_tmp` leading to it (see publish_generation).
    Best effort: without it the next publication makes them itself."""
    try:
        spare = new_generation_dir(dir_fd, directory)
    except OSError:
        return
    try:
        link_data_tmp(dir_fd, directory, spare)
    except OSError:
        remove_generation(dir_fd, spare)


def _adopt_plain_files(dir_fd: int, directory: Path, names: Sequence[str]) -> str | None:
    """Before the first generation in a directory an older wlidd wrote plain files into: carry those files
    (regular, owned by root or wlidd's user, at most ADOPT_LIMIT bytes) as they are (content, mode, owner,
    ACL) into a generation of their own, publish it and turn their names into links. Every name keeps its
    content while it becomes a link, so the new generation then replaces all of them in one step. The
    adopted generation's name, or None when there was nothing to adopt."""
    adopted: list[Entry] = []
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in trusted_uids() or st.st_size > ADOPT_LIMIT:
                continue
            data = b""
            while len(data) <= ADOPT_LIMIT and (chunk := os.read(fd, 65536)):
                data += chunk
            try:
                acl = os.getxattr(fd, posix_acl.XATTR)
            except OSError:
                acl = None
            mode = stat.S_IMODE(st.st_mode)
            adopted.append(Entry(SinkFile(name, data, mode), st.st_uid, st.st_gid, acl))
        except OSError:
            continue
        finally:
            os.close(fd)
    if not adopted:
        return None
    try:
        generation = write_generation(dir_fd, directory, adopted)
    except OSError as exc:
        log.warning("plain files of an older wlidd not carried over", dir=str(directory), error=reason(exc))
        return None
    try:
        swap_data(dir_fd, directory, generation)
    except OSError as exc:
        remove_generation(dir_fd, generation)
        log.warning("plain files of an older wlidd not carried over", dir=str(directory), error=reason(exc))
        return None
    with contextlib.suppress(OSError):  # what failed here fails (and is reported) again in publish_generation
        make_links(dir_fd, directory, [e.file.name for e in adopted])
    log.info("plain files of an older wlidd turned into links", dir=str(directory), files=len(adopted))
    return generation


def _sweep_generations(dir_fd: int, current: str | None, spare: str | None, shown: str) -> None:
    """Remove what a crash left behind: generation directories other than the current one and the spare
    (written but never published, or published over but not yet removed) and a `..data_tmp` that leads to
    no spare, when root or wlidd's user owns them; another user's are left alone and counted. One log
    line with the counts when there were any."""
    keep = {name for name in (current, spare) if name is not None} | ({DATA_TMP} if spare else set())
    try:
        with os.scandir(dir_fd) as entries:
            stale = [
                e.name for e in entries if e.name not in keep and (e.name == DATA_TMP or GENERATION.fullmatch(e.name))
            ]
    except OSError as exc:
        log.warning("stale generations not looked for", dir=shown, error=reason(exc))
        return
    removed = foreign = failed = 0
    for name in stale:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError:
            failed += 1
            continue
        if st.st_uid not in trusted_uids():
            foreign += 1
        elif stat.S_ISDIR(st.st_mode):
            if remove_generation(dir_fd, name):
                removed += 1
            else:
                failed += 1
        else:
            try:
                os.unlink(name, dir_fd=dir_fd)
                removed += 1
            except FileNotFoundError:
                continue
            except OSError:
                failed += 1
    if removed or failed:
        log.info("stale generations swept", dir=shown, removed=removed, left_to_other_users=foreign, failed=failed)
    elif foreign:  # nothing to do but another user's names: said once a minute, not at every check
        log.limited("info", "stale generations of other users left alone", key={"dir": shown}, count=foreign)
