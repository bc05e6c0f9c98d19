"""Build steps for wlidd's own virtualenv (`make install`, and `make deb` through debian/rules).

Run with the interpreter the virtualenv is built on (stdlib only, so it also runs, and refuses, on an
interpreter too old for wlidd):

    venv_tool.py check-interpreter [--unit systemd/wlidd.service] [--allow-hidden]
        exit 2 with one message when this interpreter cannot carry the installed service: older than
        pyproject's requires-python, no venv/ensurepip, or at a path that the unit's sandbox hides from
        the service (ProtectHome= hides /home, /root and /run/user; PrivateTmp= gives a private /tmp
        and /var/tmp; InaccessiblePaths= hides what it names: systemd.exec(5)). A virtualenv links to
        its interpreter (bin/python3 -> home) and takes the stdlib from the interpreter's prefix, so
        every path on the way is judged: the name as called, each symlink hop, the real file, the prefixes.
    venv_tool.py prepare STAGED
        refuse (exit 2) a non-empty STAGED that is not a virtualenv, so that `venv --clear` never
        empties a directory such as /usr/local by mistake.
    venv_tool.py finish STAGED FINAL [--forbid TEXT]...
        make the virtualenv built at STAGED correct at FINAL (they differ under DESTDIR or in a Debian
        package build): text files naming STAGED (scripts' shebangs, activate*, pyvenv.cfg's command
        line, RECORD) name FINAL instead; a direct_url.json pointing at the build tree (PEP 610,
        file:// URLs) is dropped with its RECORD line; all bytecode is deleted and compiled again with
        FINAL in its file names (compileall -d) and checked-hash invalidation (PEP 552: valid whatever
        mtimes a copy or dpkg gives the sources); then every file and symlink is searched, binary
        files too, for STAGED and each TEXT, and any hit fails the build (exit 1, listing the files).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

EXIT_REFUSED = 2
ROOT = Path(__file__).resolve().parent.parent
# systemd.exec(5): ProtectHome=yes|tmpfs makes these inaccessible (read-only leaves them readable);
# PrivateTmp=yes gives the unit its own empty /tmp and /var/tmp.
PROTECT_HOME_PATHS = ("/home", "/root", "/run/user")
PRIVATE_TMP_PATHS = ("/tmp", "/var/tmp")
TRUE_WORDS = ("1", "yes", "true", "on")


def unit_hidden_paths(unit_text: str | None) -> dict[str, str]:
    """The directories a service unit cannot see, each with the setting that hides it.

    `unit_text`: the unit file's text, or None for the strictest reading (all of the above hidden).
    Only the [Service] section counts; later assignments override earlier ones, an empty
    InaccessiblePaths= resets the list (systemd.exec(5)); a leading '-' (ignore if missing) is dropped."""
    if unit_text is None:
        return {
            **{path: "ProtectHome=yes" for path in PROTECT_HOME_PATHS},
            **{path: "PrivateTmp=yes" for path in PRIVATE_TMP_PATHS},
        }
    protect_home, private_tmp = "no", "no"
    inaccessible: list[str] = []
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section != "Service" or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key == "ProtectHome":
            protect_home = value.lower()
        elif key == "PrivateTmp":
            private_tmp = value.lower()
        elif key == "InaccessiblePaths":
            inaccessible = [] if not value else [*inaccessible, *(word.lstrip("-+") for word in value.split())]
    hidden: dict[str, str] = {}
    if protect_home in (*TRUE_WORDS, "tmpfs"):
        hidden.update({path: f"ProtectHome={protect_home}" for path in PROTECT_HOME_PATHS})
    if private_tmp in TRUE_WORDS:
        hidden.update({path: f"PrivateTmp={private_tmp}" for path in PRIVATE_TMP_PATHS})
    hidden.update({os.path.normpath(path): "InaccessiblePaths=" for path in inaccessible if path.startswith("/")})
    return hidden


def hidden_by(path: str, hidden: dict[str, str]) -> str | None:
    """The setting that hides absolute `path` (the directory itself or anything below it), else None."""
    path = os.path.normpath(path)
    for directory, setting in sorted(hidden.items()):
        if path == directory or path.startswith(directory.rstrip("/") + "/"):
            return f"{setting} hides {directory}"
    return None


def symlink_hops(path: str) -> list[str]:
    """`path` made absolute, then every path a lookup of it passes through, the real file last.

    Each hop is the next link's target (relative targets joined to the link's directory); directory
    symlinks on the way show up through the final os.path.realpath."""
    hops = [os.path.abspath(path)]
    for _ in range(40):  # the kernel's own limit (MAXSYMLINKS)
        current = hops[-1]
        if not os.path.islink(current):
            break
        hops.append(os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current))))
    real = os.path.realpath(path)
    if real not in hops:
        hops.append(real)
    return hops


def interpreter_paths() -> list[str]:
    """Every path the running interpreter's virtualenvs would depend on: the executable they link to
    (sys._base_executable: the name as called, not resolved), its symlink hops, and the stdlib prefixes."""
    executable = getattr(sys, "_base_executable", None) or sys.executable
    paths = symlink_hops(executable)
    for prefix in (sys.base_prefix, sys.base_exec_prefix):
        for candidate in (os.path.abspath(prefix), os.path.realpath(prefix)):
            if candidate not in paths:
                paths.append(candidate)
    return paths


def required_python(pyproject: Path) -> tuple[int, int] | None:
    """(major, minor) from pyproject's `requires-python = ">=X.Y"`, or None when it names none."""
    try:
        match = re.search(r'^requires-python\s*=\s*"\s*>=\s*(\d+)\.(\d+)', pyproject.read_text(), re.MULTILINE)
    except OSError:
        return None
    return (int(match.group(1)), int(match.group(2))) if match else None


def interpreter_problems(hidden: dict[str, str], minimum: tuple[int, int] | None, variable: str) -> list[str]:
    """Why the running interpreter cannot carry the installed service; empty when it can. `variable`:
    the make variable that picks another interpreter, for the messages."""
    problems = []
    if minimum is not None and sys.version_info[:2] < minimum:
        problems.append(
            f"{sys.executable} is Python {sys.version_info[0]}.{sys.version_info[1]}; wlidd needs "
            f">= {minimum[0]}.{minimum[1]} (pass {variable}=/usr/bin/python3.X, e.g. from the python3.X package)"
        )
    for module in ("venv", "ensurepip"):
        try:
            __import__(module)
        except ImportError:
            version = f"{sys.version_info[0]}.{sys.version_info[1]}"
            problems.append(
                f"{sys.executable} has no {module} module (Debian/Ubuntu: apt-get install python{version}-venv)"
            )
    for path in interpreter_paths():
        reason = hidden_by(path, hidden)
        if reason is not None:
            problems.append(
                f"the service could not run this interpreter: it lives at {path}, and the unit's {reason}; "
                f"build on the system interpreter ({variable}=/usr/bin/python3, the default)"
                + (
                    ", or pass ALLOW_HIDDEN_PYTHON=1 if the unit was changed to see it"
                    if variable == "INSTALL_PYTHON"
                    else ""
                )
            )
            break
    return problems


def check_interpreter(unit: Path | None, allow_hidden: bool, variable: str = "INSTALL_PYTHON") -> int:
    hidden = {} if allow_hidden else unit_hidden_paths(unit.read_text() if unit is not None else None)
    problems = interpreter_problems(hidden, required_python(ROOT / "pyproject.toml"), variable)
    for problem in problems:
        print(f"refused: {problem}", file=sys.stderr)
    return EXIT_REFUSED if problems else 0


def prepare(staged: Path) -> int:
    if staged.is_dir() and any(staged.iterdir()) and not (staged / "pyvenv.cfg").is_file():
        print(
            f"refused: {staged} exists, is not empty and is not a virtualenv (no pyvenv.cfg); "
            "wlidd installs its own virtualenv there and would replace everything in it: pick another PREFIX",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    return 0


def walk(top: Path) -> Iterator[Path]:
    """Every file and symlink under `top`, symlinks not followed."""
    for directory, dirnames, filenames in os.walk(top):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(directory, d))]:
            yield Path(directory, name)


def rewrite_text(top: Path, old: str, new: str) -> list[Path]:
    """Replace `old` by `new` in every text file under `top` (UTF-8, no NUL byte) that names it; the
    files rewritten. Binary files are left for the final search to report."""
    changed = []
    needle = old.encode()
    for path in walk(top):
        if path.is_symlink() or path.suffix == ".pyc":
            continue
        data = path.read_bytes()
        if needle not in data or b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        mode = path.stat().st_mode
        path.write_bytes(data.replace(needle, new.encode()))
        os.chmod(path, mode)
        changed.append(path)
    return changed


def drop_local_direct_urls(top: Path) -> list[Path]:
    """Remove each dist-info's direct_url.json that records a file:// source (the build tree, which
    does not exist where the venv runs) and its line in RECORD; the files removed."""
    removed = []
    for direct_url in top.glob("lib*/python*/site-packages/*.dist-info/direct_url.json"):
        if '"file://' not in direct_url.read_text():
            continue
        direct_url.unlink()
        record = direct_url.with_name("RECORD")
        if record.is_file():
            prefix = f"{direct_url.parent.name}/direct_url.json,"
            lines = record.read_text().splitlines(keepends=True)
            record.write_text("".join(line for line in lines if not line.startswith(prefix)))
        removed.append(direct_url)
    return removed


def recompile(staged: Path, final: str) -> None:
    """Delete every .pyc under `staged`, then compile lib/ again naming `final` in co_filename.

    Run by the venv's own interpreter with -S (no site: a .pth file would import, and cache, modules
    from the venv) and -B; compileall writes its files regardless of -B."""
    for cache in [p for p in staged.rglob("__pycache__") if p.is_dir() and not p.is_symlink()]:
        shutil.rmtree(cache)
    for stray in staged.rglob("*.pyc"):
        stray.unlink()
    python = staged / "bin" / "python"
    lib = staged / "lib"
    result = subprocess.run(
        [
            str(python),
            "-S",
            "-B",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "checked-hash",
            "-d",
            os.path.join(final, "lib"),
            str(lib),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        # files that do not compile (a package's Python 2 templates, say) cannot be imported either:
        # they get no bytecode, as with Debian's py3compile; the build goes on and says which.
        print((result.stdout + result.stderr).strip(), file=sys.stderr)


def find_mentions(top: Path, needles: Iterable[str]) -> list[str]:
    """'path: names TEXT' for every file under `top` whose bytes or symlink target contain a needle."""
    hits: list[str] = []
    encoded = [(needle, needle.encode()) for needle in needles if needle]
    for path in walk(top):
        if path.is_symlink():
            target = os.readlink(path)
            hits.extend(f"{path}: symlink to {target}" for needle, _ in encoded if needle in target)
            continue
        data = path.read_bytes()
        hits.extend(f"{path}: names {needle}" for needle, raw in encoded if raw in data)
    return hits


def readable_by_all(top: Path) -> None:
    """Make the installed tree readable (and its directories and programs usable) by every user, writable
    by its owner only, whatever umask it was built under: the service runs as its own user (umask 027,
    the CIS default, left the venv 0750/0640 root, which the unit's user cannot import from)."""
    for root, _dirs, files in os.walk(top):
        os.chmod(root, (os.stat(root).st_mode | 0o755) & 0o7755)  # noqa: S103 (a program tree: readable by all)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            wanted = mode | 0o644 | (0o111 if mode & 0o100 else 0)
            os.chmod(path, wanted & ~0o022 & 0o7777)


def finish(staged: Path, final: str, forbid: list[str]) -> int:
    staged = Path(os.path.abspath(staged))
    readable_by_all(staged)
    final = os.path.normpath(final)
    spellings = [s for s in dict.fromkeys((str(staged), os.path.realpath(staged))) if s != final]
    for spelling in spellings:  # the path as given and as resolved (a symlinked /tmp, say)
        rewrite_text(staged, spelling, final)
    drop_local_direct_urls(staged)
    recompile(staged, final)
    needles = list(spellings)
    # a forbidden text that FINAL itself contains (PREFIX inside the checkout) cannot be searched for
    needles += [os.path.normpath(os.path.abspath(text)) for text in forbid]
    needles = [n for n in dict.fromkeys(needles) if not (final == n or final.startswith(n.rstrip("/") + "/"))]
    hits = find_mentions(staged, needles)
    for hit in hits[:50]:
        print(f"not relocatable: {hit}", file=sys.stderr)
    if hits:
        print(
            f"{len(hits)} file(s) under {staged} name the build location; they would break at {final}", file=sys.stderr
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-interpreter", help="may this interpreter carry the installed service?")
    check.add_argument("--unit", type=Path, help="the service unit whose sandbox decides (default: the strictest)")
    check.add_argument("--allow-hidden", action="store_true", help="skip the sandbox check")
    check.add_argument("--variable", default="INSTALL_PYTHON", help="the make variable named in messages")
    prep = sub.add_parser("prepare", help="refuse a PREFIX that is not (yet) a virtualenv")
    prep.add_argument("staged", type=Path)
    fin = sub.add_parser("finish", help="make the venv at STAGED correct at FINAL, and prove it")
    fin.add_argument("staged", type=Path)
    fin.add_argument("final")
    fin.add_argument("--forbid", action="append", default=[], help="a path no installed file may name")
    args = parser.parse_args(argv)
    if args.command == "check-interpreter":
        return check_interpreter(args.unit, args.allow_hidden, args.variable)
    if args.command == "prepare":
        return prepare(args.staged)
    return finish(args.staged, args.final, args.forbid)


if __name__ == "__main__":
    sys.exit(main())
