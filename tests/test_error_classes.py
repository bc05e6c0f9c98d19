"""Every error class of wlidd is a WlidError defined in wlidd/errors.py, with a stable reason; parsers
refuse with one (never a bare ValueError); the local API's routes raise their refusals, never return them.

The structural checks read the source (ast), as tests/test_layers.py does: a new exception class elsewhere,
or a route function returning `X | Response`, fails here with its place named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from wlidd import errors, posix_acl
from wlidd.api.metadata_scopes import MAX_SCOPES, parse_scopes
from wlidd.config import Config, split_address
from wlidd.errors import (
    ApiError,
    ClientError,
    InvalidValue,
    ListenerError,
    NotRegularFile,
    PeerRefused,
    RateLimited,
    SinkRefused,
    TokenUnavailable,
    WlidError,
)
from wlidd.sinks.generations import publish_generation
from wlidd.sinks.layouts import Material, SinkFile, layout_files
from wlidd.svid.spiffeid import parse_matcher

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wlidd"
_EXCEPTION_BASES = {"Exception", "BaseException", "OSError", "ValueError", "RuntimeError", "LookupError"}


def _base_names(node: ast.ClassDef) -> list[str]:
    return [base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases]


def test_every_exception_class_of_wlidd_is_defined_in_errors_py() -> None:
    """One tree to read (the docstring of wlidd/errors.py draws it), so every error gets its hints."""
    elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "errors.py" or "emulator" in path.parts or path.name.endswith("_pb2.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = _base_names(node)
                if any(b in _EXCEPTION_BASES or b.endswith(("Error", "Exception", "Refused")) for b in bases):
                    elsewhere.append(f"{path.relative_to(ROOT)}:{node.lineno} class {node.name}")
    assert not elsewhere, "define these in wlidd/errors.py as WlidError subclasses:\n  " + "\n  ".join(elsewhere)


def test_every_class_in_errors_py_is_a_wlid_error_named_in_its_tree() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)]
    assert {c.__name__ for c in classes} >= {
        "ListenerError",
        "TokenUnavailable",
        "RateLimited",
        "PeerRefused",
        "ClientError",
        "SinkRefused",
        "NotRegularFile",
        "InvalidValue",
    }
    for cls in classes:
        assert issubclass(cls, WlidError), cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} is missing from the tree in errors.py"


@pytest.mark.parametrize(
    ("error", "reason", "status"),
    [
        (ListenerError("listeners.unix: in use"), "listener", 500),
        (TokenUnavailable("gcp", "no valid SVID"), "token_unavailable", 503),
        (RateLimited("slow down", 0.2), "rate_limited", 429),
        (PeerRefused("the calling socket 127.0.0.1:4 is TIME_WAIT"), "forbidden", 403),
        (ClientError(0, "not_running", "cannot reach wlidd"), "not_running", 500),
        (InvalidValue("address", "'x' is not host:port"), "address", 400),
        (SinkRefused("directory /x belongs to uid 7"), "sink_refused", 500),
        (NotRegularFile(0, "is a directory", "/etc"), "not_regular_file", 500),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_each_error_carries_a_stable_reason_and_an_http_status_hint(error: WlidError, reason: str, status: int) -> None:
    assert isinstance(error, WlidError)
    assert (error.reason, error.http_status) == (reason, status)


def test_the_two_os_errors_stay_os_errors_with_os_error_text() -> None:
    """Every path's OSError handling still covers them, and their text is what it was."""
    refused = SinkRefused("pid file /run/x is a symbolic link")
    assert isinstance(refused, OSError) and str(refused) == "pid file /run/x is a symbolic link"
    assert refused.errno is None
    not_regular = NotRegularFile(0, "is a directory", "/etc")
    assert isinstance(not_regular, OSError) and str(not_regular) == "[Errno 0] is a directory: '/etc'"
    assert (not_regular.errno, not_regular.strerror, not_regular.filename) == (0, "is a directory", "/etc")


def test_peer_refused_is_the_403_the_metadata_api_answers() -> None:
    refused = PeerRefused("the calling socket 127.0.0.1:4 changed owner since it was identified")
    assert isinstance(refused, ApiError) and refused.http_status == 403 and refused.reason == "forbidden"


# ---- parsers refuse with an InvalidValue, not a ValueError ---------------------------------------------
@pytest.mark.parametrize(
    ("parse", "value", "reason"),
    [
        (parse_matcher, "https://example.org/x", "spiffe_id_matcher"),
        (parse_matcher, "spiffe://example.org/**/x", "spiffe_id_matcher"),
        (split_address, "localhost", "address"),
        (split_address, "127.0.0.1:99999", "address"),
        (parse_scopes, ["x" * 600], "scopes"),
        (parse_scopes, [",".join(f"s{i}" for i in range(MAX_SCOPES + 1))], "scopes"),
        (posix_acl.decode, b"\x01\0\0\0", "posix_acl"),  # version 1
        (posix_acl.decode, b"\x02\0\0\0\x01", "posix_acl"),  # truncated
        (posix_acl.encode, [posix_acl.Entry(posix_acl.USER, 7, 4)], "posix_acl"),  # no USER_OBJ, no mask
        (lambda name: SinkFile(name, b"", 0o644), "..data", "sink_file_name"),
        (lambda layout: layout_files(layout, Material(b"", b"", "example.org", b""), Path("/x")), "x", "sink_layout"),
        (lambda name: publish_generation(Path("/x"), [SinkFile(name, b"", 0o644)] * 2), "a.pem", "sink_file_name"),
    ],
)
def test_a_parser_refuses_with_an_invalid_value_naming_its_rule(parse: object, value: object, reason: str) -> None:
    assert callable(parse)
    with pytest.raises(WlidError) as refused:
        parse(value)
    assert isinstance(refused.value, InvalidValue) and not isinstance(refused.value, ValueError)
    assert refused.value.reason == reason


def test_a_config_validator_still_reports_a_bad_matcher_and_address_against_its_key() -> None:
    """pydantic turns only ValueError into a validation error: the validators convert InvalidValue."""
    with pytest.raises(ValidationError) as bad_matcher:
        Config.model_validate({"policy": {"tokens": {"spiffe_ids": ["https://x"]}}})
    assert "is not a SPIFFE ID matcher" in str(bad_matcher.value) and "policy.tokens" in str(bad_matcher.value)
    with pytest.raises(ValidationError) as bad_address:
        Config.model_validate({"listeners": {"metrics": {"address": "nowhere"}}})
    assert "'nowhere' is not host:port" in str(bad_address.value) and "metrics" in str(bad_address.value)


# ---- routes raise their refusals -----------------------------------------------------------------------
def test_no_api_function_returns_an_error_as_a_response_value() -> None:
    """`X | Response` return types made every caller check what came back; an ApiError is raised instead
    and answered at the boundary (the route table's `_answer`, the HTTP server)."""
    found = []
    for path in sorted((PACKAGE / "api").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
                text = ast.unparse(node.returns)
                if "|" in text and "Response" in [part.strip() for part in text.split("|")]:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} -> {text}")
    assert not found, "raise an ApiError instead of returning a Response beside a value:\n  " + "\n  ".join(found)
