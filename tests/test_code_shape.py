"""The shape of wlidd/: no module over MAX_MODULE_LINES lines and no function over MAX_FUNCTION_LINES lines,
unless the code says why where it stands (issue 17: a long module or function hides the decisions in it).

- A function (or method; a nested one counts on its own) may be longer when the line right above its `def`
  (above its first decorator, when it has any) is a comment `# long: <reason>`.
- A module may be longer when the first paragraph of its docstring (up to the first blank line) has a line
  starting `Long: <reason>`.
- A reason stands only where the code is over its limit: once the code shrinks, the reason goes too.

Lengths count lines from the `def` to the function's last line (its docstring included), and every line of
a module. Read from the source (ast), nothing imported. Generated protobuf modules (`*_pb2.py`,
`*_pb2_grpc.py`) are left out: they are not written by hand.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wlidd"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
GENERATED = re.compile(r".*_pb2(_grpc)?\.py")
FUNCTION_REASON = re.compile(r"\s*# long: \S")
MODULE_REASON = re.compile(r"\s*Long: \S")


@dataclass(frozen=True)
class Shape:
    """A module or a function: where, what, how many lines, and whether a reason for its length is given."""

    where: str
    what: str
    lines: int
    reason: bool

    def __str__(self) -> str:
        return f"  {self.where}: {self.what} has {self.lines} lines"


def modules() -> list[Path]:
    """wlidd's hand-written modules."""
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not GENERATED.fullmatch(p.name)]


def module_shape(path: Path, text: str) -> Shape:
    """The module's length, and whether the first paragraph of its docstring says why it is long."""
    first = (ast.get_docstring(ast.parse(text)) or "").split("\n\n")[0]
    reason = any(MODULE_REASON.match(line) for line in first.splitlines())
    return Shape(str(path), "the module", len(text.splitlines()), reason)


def function_shapes(path: Path, text: str) -> list[Shape]:
    """Every function's length (from `def` to its last line), and whether the line above it says why."""
    lines = text.splitlines()
    shapes = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            top = min([d.lineno for d in node.decorator_list] + [node.lineno])  # 1-based
            reason = top >= 2 and FUNCTION_REASON.match(lines[top - 2]) is not None
            count = (node.end_lineno or node.lineno) - node.lineno + 1
            shapes.append(Shape(f"{path}:{node.lineno}", f"{node.name}()", count, reason))
    return shapes


def unexcused(shapes: list[Shape], limit: int) -> list[Shape]:
    return [shape for shape in shapes if shape.lines > limit and not shape.reason]


def needless(shapes: list[Shape], limit: int) -> list[Shape]:
    return [shape for shape in shapes if shape.lines <= limit and shape.reason]


def shown(path: Path) -> Path:
    return path.relative_to(ROOT)


def all_modules() -> list[Shape]:
    return [module_shape(shown(path), path.read_text()) for path in modules()]


def all_functions() -> list[Shape]:
    return [shape for path in modules() for shape in function_shapes(shown(path), path.read_text())]


def test_every_module_of_wlidd_is_at_most_400_lines_or_its_docstring_says_why() -> None:
    found = unexcused(all_modules(), MAX_MODULE_LINES)
    assert not found, (
        f"modules over {MAX_MODULE_LINES} lines: split them by concern, or say why in the first paragraph of "
        "the docstring with a line `Long: <reason>`:\n" + "\n".join(map(str, found))
    )


def test_every_function_of_wlidd_is_at_most_60_lines_or_the_line_above_says_why() -> None:
    found = unexcused(all_functions(), MAX_FUNCTION_LINES)
    assert not found, (
        f"functions over {MAX_FUNCTION_LINES} lines: split them where a split is natural, or say why in a "
        "comment `# long: <reason>` on the line above the def (above its decorators):\n" + "\n".join(map(str, found))
    )


def test_a_reason_stands_only_where_the_code_is_long_so_reasons_go_once_it_shrinks() -> None:
    found = needless(all_modules(), MAX_MODULE_LINES) + needless(all_functions(), MAX_FUNCTION_LINES)
    assert not found, (
        "these are within their limit now: remove the `Long:` line of the docstring or the `# long:` comment:\n"
        + "\n".join(map(str, found))
    )


def test_the_checker_counts_from_def_to_the_last_line_and_takes_a_reason_only_right_above() -> None:
    """The measures themselves, on sources they are given: nested functions count on their own, a reason
    counts only on the line right above the def or its first decorator, and a module's only in the first
    paragraph of its docstring."""
    body = "".join(f"    x{i} = {i}\n" for i in range(3))  # a 4-line function: `def` and 3 lines
    source = (
        f"def plain():\n{body}"
        f"# long: a table\ndef excused():\n{body}"
        f"# long: a table\n\ndef too_far():\n{body}"
        f"# long: a table\n@decorated\ndef decorated_excused():\n{body}"
        f"@decorated\n# long: inside the decorators\ndef decorated_too_late():\n{body}"
        "class Holder:\n    async def method(self):\n        def inner():\n            return 1\n        return 2\n"
        "# long: not any more\ndef short():\n    return 0\n"
    )
    shapes = function_shapes(Path("probe.py"), source)
    assert {s.what: s.lines for s in unexcused(shapes, 3)} == {
        "plain()": 4,
        "too_far()": 4,
        "decorated_too_late()": 4,
        "method()": 4,
    }
    assert [s.what for s in needless(shapes, 3)] == ["short()"]
    assert unexcused(shapes, 4) == []
    assert sorted(s.what for s in needless(shapes, 4)) == ["decorated_excused()", "excused()", "short()"]

    excused = '"""A module.\nLong: one table of many rows.\n\nMore text."""\n' + "x = 1\n" * 5
    late = '"""A module.\n\nLong: said too late, after the first paragraph."""\n' + "x = 1\n" * 5
    assert module_shape(Path("m.py"), excused) == Shape("m.py", "the module", 9, True)
    assert module_shape(Path("m.py"), late) == Shape("m.py", "the module", 8, False)
    assert module_shape(Path("m.py"), "x = 1\n") == Shape("m.py", "the module", 1, False)
    assert GENERATED.fullmatch("workload_pb2.py") and GENERATED.fullmatch("workload_pb2_grpc.py")
    assert not GENERATED.fullmatch("server.py")
