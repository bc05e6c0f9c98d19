"""systemd unit names, and the unit a process's cgroup names, exactly as systemd names it. Pure.

Unit names (systemd.unit(5); src/basic/unit-name.c `unit_name_is_valid`): "prefix[@instance].type",
shorter than 256 characters (UNIT_NAME_MAX), the prefix and instance made of ASCII letters, digits and
`:-_.\\` (the instance may hold more `@`), the type one of the eleven unit types. A template has an empty
instance (`getty@.service`); an instance fills it (`getty@tty1.service`). Escaped characters stay as
systemd writes them: `/dev/disk/by-uuid` is the instance `dev-disk-by\\x2duuid` (systemd-escape(1)).

A process's units (src/basic/cgroup-util.c, which `sd_pid_get_unit(3)` and `sd_pid_get_user_unit(3)` use):

    cg_pid_get_path            the `0::<path>` line of /proc/PID/cgroup (the unified hierarchy: systemd
                               runs on it on every host it still supports, the v2 and hybrid layouts);
                               a path from outside the reader's cgroup namespace ("/../…") has no unit;
                               a zombie's " (deleted)" suffix is cut
    cg_shift_path              a path below pid 1's own root (its cgroup without "/init.scope") is
                               taken relative to it (systemd in a container without a cgroup namespace)
    cg_path_get_unit           skip the leading slices (`user.slice/user-1000.slice/`), then the next
                               component, one leading "_" removed (cg_unescape), must be a plain or
                               instance unit name and not a slice: `billing.service`, `session-3.scope`,
                               `user@1000.service`, `getty@tty1.service`
    cg_path_get_user_unit      after the slices, a user manager (`user@<uid>.service`, `capsule@<name>
                               .service`) or a login session (`session-<id>.scope`) must follow; the unit
                               below it, found as above: `/user.slice/user-1000.slice/user@1000.service/
                               app.slice/x.service` is the user unit `x.service` of `user@1000.service`

So a container's cgroup (`/docker/<id>`, `/kubepods/…`) names no unit: only its path is known.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from wlidd.errors import InvalidValue

UNIT_NAME_MAX = 256  # a unit name is shorter than this (src/basic/unit-name.h)
# src/core/unit-def.c unit_type_table
UNIT_TYPES = frozenset(
    {"service", "socket", "target", "device", "mount", "automount", "swap", "timer", "path", "slice", "scope"}
)
_VALID_CHARS = frozenset(string.ascii_letters + string.digits + ":-_.\\")  # unit-name.c VALID_CHARS
_ALNUM = frozenset(string.ascii_letters + string.digits)
_INIT_SCOPE = "init.scope"  # src/basic/special.h SPECIAL_INIT_SCOPE


def unit_name_kind(name: str) -> str | None:
    """The kind of a valid unit name: "plain", "instance" or "template"; None for anything else
    (unit-name.c `unit_name_is_valid`)."""
    if not name or len(name) >= UNIT_NAME_MAX:
        return None
    dot = name.rfind(".")
    if dot <= 0 or name[dot + 1 :] not in UNIT_TYPES:
        return None
    prefix = name[:dot]
    if any(c != "@" and c not in _VALID_CHARS for c in prefix):
        return None
    at = prefix.find("@")
    if at == 0:
        return None
    if at < 0:
        return "plain"
    return "template" if at == len(prefix) - 1 else "instance"


def template_of(unit: str) -> str | None:
    """The template an instance comes from (`getty@tty1.service` → `getty@.service`), else None."""
    if unit_name_kind(unit) != "instance":
        return None
    return unit[: unit.index("@") + 1] + unit[unit.rindex(".") :]


def check_unit_selector(name: str) -> str:
    """A `units` entry of [policy]: a plain, instance or template unit name (a template matches every
    instance of it), never a slice (a process's unit is the one below its slices). InvalidValue
    ("unit_name") naming the rule otherwise."""
    kind = unit_name_kind(name)
    if kind is None:
        raise InvalidValue(
            "unit_name",
            f"{name!r} is not a systemd unit name: prefix[@instance].type, letters, digits and ':-_.\\' "
            f"(e.g. 'billing.service', 'worker@.service', 'session-3.scope'; systemd.unit(5))",
        )
    if name.endswith(".slice"):
        raise InvalidValue("unit_name", f"{name!r} is a slice: a process's unit is the unit below its slices")
    return name


def _unescape(component: str) -> str:
    """cg_unescape: systemd prefixes a cgroup name that could clash with the kernel's own with one '_'."""
    return component[1:] if component.startswith("_") else component


def _first(path: str) -> str:
    return path.split("/", 1)[0]


def _valid_slice_name(component: str) -> bool:
    return (
        len(component) >= len("x.slice")
        and component.endswith(".slice")
        and unit_name_kind(_unescape(component)) == "plain"
    )


def _skip_slices(path: str) -> str:
    while True:
        path = path.lstrip("/")
        component = _first(path)
        if not _valid_slice_name(component):
            return path
        path = path[len(component) :]


def unit_of_path(path: str) -> str | None:
    """The system unit of a cgroup path (cg_path_get_unit), None when it names none."""
    rest = _skip_slices(path)
    component = _first(rest)
    if len(component) < 3:
        return None
    unit = _unescape(component)
    if unit_name_kind(unit) not in ("plain", "instance") or unit.endswith(".slice"):
        return None
    return unit


def _valid_uid(text: str) -> bool:
    """parse_uid (src/basic/user-util.c): decimal, not (uid_t) -1 nor the 16-bit -1."""
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        return False
    return int(text) < 2**32 and int(text) not in (0xFFFFFFFF, 0xFFFF)


def _valid_capsule(name: str) -> bool:
    """capsule_name_is_valid (src/basic/capsule-util.c): "c-<name>" must be a strict user name."""
    prefixed = "c-" + name
    return len(prefixed) <= 31 and all(c in _ALNUM or c in "_-" for c in prefixed)


def _skip_user_manager(path: str) -> str | None:
    path = path.lstrip("/")
    component = _first(path)
    if len(component) < len("user@x.service") or unit_name_kind(component) != "instance":
        return None
    instance = component[component.index("@") + 1 : component.rindex(".")]
    user = component.startswith("user@") and _valid_uid(instance)
    if not user and not (component.startswith("capsule@") and _valid_capsule(instance)):
        return None
    return path[len(component) :].lstrip("/")


def _skip_session(path: str) -> str | None:
    path = path.lstrip("/")
    component = _first(path)
    if len(component) < len("session-x.scope") or not component.startswith("session-"):
        return None
    if not component.endswith(".scope"):
        return None
    session = component[len("session-") : -len(".scope")]
    if not session or any(c not in _ALNUM for c in session):
        return None
    return path[len(component) :].lstrip("/")


def user_unit_of_path(path: str) -> str | None:
    """The user unit of a cgroup path (cg_path_get_user_unit): the unit below a user manager or a login
    session, None when there is none."""
    rest = _skip_slices(path)
    below = _skip_user_manager(rest) if rest else None
    if below is None:
        below = _skip_session(rest) if rest else None
    return None if below is None else unit_of_path(below)


def unified_path(cgroup_file: str) -> str | None:
    """The unified hierarchy's path in a /proc/PID/cgroup text (the first `0::<path>` line), its zombie
    suffix " (deleted)" cut; None when the text has no such line (a cgroup v1 only host)."""
    for line in cgroup_file.splitlines():
        if not line.startswith("0:"):
            continue
        _, colon, path = line[2:].partition(":")
        if not colon:
            continue
        return path.removesuffix(" (deleted)")
    return None


def shift_path(path: str, root: str) -> str:
    """cg_shift_path: `path` relative to `root` when it lies below it (a leading "/" kept), else as is."""
    root_parts = [c for c in root.split("/") if c]
    parts = [c for c in path.split("/") if c]
    if not root_parts or ".." in parts or parts[: len(root_parts)] != root_parts:
        return path
    return "/" + "/".join(parts[len(root_parts) :])


def init_root(init_cgroup_file: str | None) -> str:
    """cg_get_root_path: pid 1's unified path without its "/init.scope" ("" when unknown)."""
    path = unified_path(init_cgroup_file) if init_cgroup_file else None
    if path is None:
        return ""
    return path.removesuffix("/" + _INIT_SCOPE)


@dataclass(frozen=True)
class CgroupFacts:
    """What a /proc/PID/cgroup text says: the unified `path` (None: no cgroup v2 line), the system `unit`
    and `user_unit` as systemd names them (None: none), and why there is no unit (`problem`, else "")."""

    path: str | None
    unit: str | None = None
    user_unit: str | None = None
    problem: str = ""


def cgroup_facts(cgroup_file: str, root: str = "") -> CgroupFacts:
    """The facts of a /proc/PID/cgroup text; `root`: pid 1's root (`init_root`) to shift paths by."""
    path = unified_path(cgroup_file)
    if path is None:
        return CgroupFacts(None, problem="it has no cgroup v2 (unified hierarchy) entry: a cgroup v1 only host")
    if path.startswith("/../"):
        return CgroupFacts(path, problem=f"its cgroup {path} is outside wlidd's cgroup namespace")
    shifted = shift_path(path, root)
    unit = unit_of_path(shifted)
    if unit is None:
        return CgroupFacts(path, problem=f"its cgroup {path} names no systemd unit")
    return CgroupFacts(path, unit, user_unit_of_path(shifted))
