"""What a re-read config changes (wlidd.config_reload): each section's rule, as a pure function of the
running config and the new one, no daemon, no files read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FileSet
from wlidd.config import Config
from wlidd.config_reload import config_changes

METADATA = {"flow": "gce-metadata", "metadata": {"url": "http://127.0.0.1:9/"}}
X509 = {
    "flow": "x509-sts",
    "identity": "default",
    "sts": {"url": "https://127.0.0.1:9/v1/token", "audience": "//iam.googleapis.com/projects/1/x"},
}


def config(files: FileSet, tmp_path: Path, **sections: Any) -> Config:
    document: dict[str, Any] = {
        "identities": {"default": files.config()},
        "tokens": {"mds": METADATA},
        "listeners": {"unix": {"path": str(tmp_path / "wlidd.sock")}},
    }
    return Config.model_validate(document | sections)


def test_nothing_changed_changes_nothing(files: FileSet, tmp_path: Path) -> None:
    old = config(files, tmp_path)
    changes = config_changes(old, config(files, tmp_path))
    assert not changes.live and changes.restart == () and changes.running == old


def test_the_log_level_is_live_and_the_runtime_dir_waits_for_a_restart(files: FileSet, tmp_path: Path) -> None:
    old = config(files, tmp_path)
    new = config(files, tmp_path, daemon={"log_level": "debug", "runtime_dir": str(tmp_path / "run")})
    changes = config_changes(old, new)
    assert changes.logging and changes.restart == ("daemon.runtime_dir",)
    assert changes.running.daemon.log_level == "debug" and changes.running.daemon.runtime_dir == old.daemon.runtime_dir


def test_an_identitys_sinks_are_live_and_anything_else_of_it_waits_for_a_restart(
    files: FileSet, tmp_path: Path
) -> None:
    old = config(files, tmp_path)
    sinks = config(files, tmp_path, identities={"default": files.config(sinks=[{"dir": str(tmp_path / "out")}])})
    changes = config_changes(old, sinks)
    assert changes.identity_sinks == ("default",) and changes.restart == ()
    assert changes.running.identities["default"] == sinks.identities["default"]

    other = config(files, tmp_path, identities={"default": files.config(mismatch_retries=5)})
    changes = config_changes(old, other)
    assert changes.identity_sinks == () and changes.restart == ("identities.default",)
    assert changes.running.identities["default"] == old.identities["default"]


def test_an_identity_added_or_removed_waits_for_a_restart(files: FileSet, tmp_path: Path) -> None:
    old = config(files, tmp_path)
    added = config(files, tmp_path, identities={"default": files.config(), "web": files.config()})
    assert config_changes(old, added).restart == ("identities.web (added or removed)",)
    assert set(config_changes(old, added).running.identities) == {"default"}


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ({"mds": METADATA | {"sinks": [{"path": "/run/t"}]}}, {"mds": "sinks"}),
        ({"mds": METADATA | {"timeout": 3}}, {"mds": "replaced"}),
        ({}, {"mds": "replaced"}),
        ({"mds": METADATA, "more": METADATA}, {"more": "replaced"}),
    ],
    ids=["sinks only", "another setting", "removed", "added"],
)
def test_a_token_source_takes_new_sinks_live_and_is_replaced_for_anything_else(
    files: FileSet, tmp_path: Path, tokens: dict[str, Any], expected: dict[str, str]
) -> None:
    new = config(files, tmp_path, tokens=tokens)
    changes = config_changes(config(files, tmp_path), new)
    assert dict(changes.tokens) == expected and changes.restart == ()
    assert dict(changes.running.tokens) == dict(new.tokens)  # what runs now: the new token configs


def test_a_token_whose_identity_is_not_running_waits_for_a_restart(files: FileSet, tmp_path: Path) -> None:
    old = config(files, tmp_path)
    identities = {"default": files.config(), "web": files.config()}
    new = config(files, tmp_path, identities=identities, tokens={"mds": METADATA, "x": X509 | {"identity": "web"}})
    changes = config_changes(old, new)
    assert changes.restart == ("identities.web (added or removed)", "tokens.x (its identity is not running)")
    assert dict(changes.tokens) == {}
    assert set(changes.running.tokens) == {"mds"}


def test_the_metadata_listeners_token_keeps_its_flow_until_a_restart(files: FileSet, tmp_path: Path) -> None:
    metadata = {"token": "mds", "email": "app@project.iam.gserviceaccount.com"}
    listeners = {"unix": {"path": str(tmp_path / "wlidd.sock")}, "metadata": metadata}
    old = config(files, tmp_path, listeners=listeners)
    changes = config_changes(old, config(files, tmp_path, listeners=listeners, tokens={"mds": X509}))
    assert changes.restart == ("tokens.mds (served by the metadata listener)",)
    assert changes.running.tokens["mds"] == old.tokens["mds"]
    same_flow = config(files, tmp_path, listeners=listeners, tokens={"mds": METADATA | {"timeout": 3}})
    assert dict(config_changes(old, same_flow).tokens) == {"mds": "replaced"}


def test_listeners_wait_for_a_restart_and_the_policy_is_live(files: FileSet, tmp_path: Path) -> None:
    old = config(files, tmp_path)
    new = config(
        files,
        tmp_path,
        listeners={"unix": {"path": str(tmp_path / "other.sock")}},
        policy={"tokens": {"users": ["root"]}},
    )
    changes = config_changes(old, new)
    assert changes.restart == ("listeners",)
    assert changes.running.listeners == old.listeners and changes.running.policy == new.policy
