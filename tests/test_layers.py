"""The layers: every import in wlidd/ goes down the layer table (README "Architecture"), never up, no cycles.

The imports are read from the source (ast), not by importing anything: module-level imports (those under
`if TYPE_CHECKING:` too, as they are dependencies all the same) and function-level ones (lazy imports,
made on first call), each reported in its own test so a lazy import cannot hide an upward dependency.
A module may import its own layer and the layers below it. The imports still going up are named, with
the change that removes each, in KNOWN_UPWARD, which may only shrink: an entry no longer needed fails
the suite until it is deleted.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wlidd"
README = ROOT / "README.md"

# The layer table, top first; the same text as the README's "Architecture" section (a test below keeps the
# two equal). Each line: a layer's name, then its modules as `wlidd.<name>` (a package stands for all its
# modules; the longest name that covers a module decides); `#` starts a comment.
LAYERS_TEXT = """\
# layer  modules (wlidd.<name>)                        a module imports its own layer and the layers below
top      cli daemon oneshot emulator client __main__   # entry points: start and wire things, decide nothing
edges    api workload_api                              # sockets and protocols: HTTP, metadata, mTLS, Workload API
state    health runtime status_report services sinks   # over published states: health, status, a reload's value, sinks
tokens   tokens                                        # token sources (the refresh loop), flows, providers
reload   watch dirwatch svid.load workload.proc workload.digest  # one reload path; the edges that read files and /proc
cores    tlsctx policy                                 # TLS contexts of an identity; who may have what
config   config config_toml config_reload              # the config models, validated once; what a reload changes
pure     svid tokens.model tokens.schedule workload    # pure functions over bytes and values, `now` passed in
bottom   __init__ clock accounts safedir posix_acl errors logs metrics systemd lifecycle status
"""

# Named in the table before the module exists: each must match no module yet (then it leaves this set).
PLANNED: frozenset[str] = frozenset()

# Imports that still go up, as (importer, imported): each with the change that removes it. Only shrinks.
KNOWN_UPWARD: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function: made on the first call, not at import time

    def where(self) -> str:
        return f"{self.importer.replace('.', '/')}.py:{self.line}" + (" (in a function)" if self.lazy else "")


def parse_layers(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """(layer, module names) top first, from the table's text."""
    layers = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split()
        if line:
            layers.append((line[0], tuple(line[1:])))
    return layers


def readme_layers_text() -> str | None:
    """The first fenced block of the README's "Architecture" section, or None when it has no such section."""
    found = re.search(r"^#{2,3} Architecture[ \t]*\n(.*?)^```[^\n]*\n(.*?)^```", README.read_text(), re.M | re.S)
    return found.group(2) if found else None


LAYERS = parse_layers(LAYERS_TEXT)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_entry(module: str) -> str | None:
    """The table name that places `module`: the longest one covering it."""
    best = None
    for _, names in LAYERS:
        for name in names:
            full = {"__init__": "wlidd"}.get(name, f"wlidd.{name}")
            covers = module == full or (name != "__init__" and module.startswith(full + "."))
            if covers and (best is None or len(full) > len({"__init__": "wlidd"}.get(best, f"wlidd.{best}"))):
                best = name
    return best


def rank(module: str) -> int:
    """0 for the top layer, growing downwards."""
    entry = layer_entry(module)
    assert entry is not None, f"{module} is in no layer"
    return next(index for index, (_, names) in enumerate(LAYERS) if entry in names)


def layer_of(module: str) -> str:
    return LAYERS[rank(module)][0]


def _imports(module: str, path: Path) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def targets(node: ast.Import | ast.ImportFrom) -> Iterator[str]:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            return
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        for alias in node.names:  # `from wlidd import posix_acl` imports the submodule
            yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base

    def walk(node: ast.AST, lazy: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in targets(child):
                    if target == "wlidd" or target.startswith("wlidd."):
                        yield Import(module, target, child.lineno, lazy)
            yield from walk(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    yield from walk(ast.parse(path.read_text(), str(path)), False)


def all_imports() -> list[Import]:
    """Every import of a wlidd module by a wlidd module, once per statement and module imported."""
    return list(dict.fromkeys(found for module, path in MODULES.items() for found in _imports(module, path)))


def upward(imports: list[Import]) -> list[Import]:
    """The imports going up (a module in no layer is left to the placement test)."""
    placed = [i for i in imports if layer_entry(i.importer) is not None and layer_entry(i.imported) is not None]
    return [i for i in placed if rank(i.imported) < rank(i.importer)]


def describe(found: list[Import]) -> str:
    return "\n".join(
        f"  {i.importer} ({layer_of(i.importer)}) imports {i.imported} ({layer_of(i.imported)}) at {i.where()}"
        for i in found
    )


def test_every_module_of_wlidd_is_placed_in_exactly_one_layer_and_every_name_in_the_table_is_a_module() -> None:
    names = [name for _, modules in LAYERS for name in modules]
    assert len(names) == len(set(names)), "a name is in two layers"
    unplaced = [m for m in MODULES if layer_entry(m) is None]
    assert not unplaced, f"place these modules in a layer of the table (README 'Architecture'): {unplaced}"
    placing = {layer_entry(m) for m in MODULES}
    unused = sorted(set(names) - placing - PLANNED)
    assert not unused, f"these names in the layer table match no module of wlidd/: {unused}"
    arrived = sorted(PLANNED & placing)
    assert not arrived, f"{arrived} exist now: remove them from PLANNED"


def test_no_module_level_import_goes_up_a_layer() -> None:
    found = [i for i in upward(all_imports()) if not i.lazy and (i.importer, i.imported) not in KNOWN_UPWARD]
    assert not found, "module-level imports going up the layer table:\n" + describe(found)


def test_no_function_level_import_goes_up_a_layer() -> None:
    """A lazy import breaks an import-time cycle but not the dependency: it must go down as well."""
    found = [i for i in upward(all_imports()) if i.lazy and (i.importer, i.imported) not in KNOWN_UPWARD]
    assert not found, "function-level (lazy) imports going up the layer table:\n" + describe(found)


def test_every_known_upward_import_is_still_there_so_the_list_only_shrinks() -> None:
    still = {(i.importer, i.imported) for i in upward(all_imports())}
    gone = sorted(KNOWN_UPWARD - still)
    assert not gone, f"these imports no longer go up: remove them from KNOWN_UPWARD in {__file__}: {gone}"


def test_the_imports_of_wlidd_form_no_cycle() -> None:
    """Over every import, module-level and lazy: a cycle is two modules that cannot be understood apart."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for found in all_imports():
        if found.imported != found.importer:
            graph[found.importer].add(found.imported)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_module_level_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    """The walker itself: each import form it must recognise, on a module it is given."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from wlidd.errors import WlidError\n"
        "import wlidd.sinks\n"
        "from wlidd import posix_acl, __version__\n"
        "from .svid import model\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from wlidd.daemon import Daemon\n"
        "class Holder:\n"
        "    from wlidd.logs import get_logger\n"
        "    def method(self) -> None:\n"
        "        from wlidd.api.authz import Policy\n"
        "async def later() -> None:\n"
        "    import wlidd.cli\n"
    )
    found = {(i.imported, i.lazy) for i in _imports("wlidd.probe", source)}
    assert found == {
        ("wlidd.errors", False),
        ("wlidd.sinks", False),
        ("wlidd.posix_acl", False),
        ("wlidd", False),
        ("wlidd.svid.model", False),
        ("wlidd.daemon", False),
        ("wlidd.logs", False),
        ("wlidd.api.authz", True),
        ("wlidd.cli", True),
    }


def test_the_readme_architecture_section_holds_the_layer_table_this_test_checks() -> None:
    text = readme_layers_text()
    assert text is not None, "README.md has no '## Architecture' section with the layer table in a code block"
    assert parse_layers(text) == LAYERS, "README 'Architecture' and LAYERS_TEXT in tests/test_layers.py differ"
