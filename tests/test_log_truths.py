"""What the logs say is what happened (issue 16, "README truths"):

1. A [policy] user or group that does not exist on the host is a warning (log and `wlidd check`),
   logged when the policy is resolved (start, each reload), never per request; a reload resolves the
   names again, so a group created after start takes effect with `systemctl reload`.
2. A reload logs a line for each part that changed, and only for those; a reload that changed nothing
   says "config unchanged".
3. A token refresh names its real trigger: start, config, scheduled, retry, svid_rotated, cold,
   id_token, scoped_token (wlidd.tokens.schedule.TRIGGERS).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import FileSet, in_background, wait_until
from tests.test_cli import write_config as cli_config
from tests.test_tokens import metadata_token_config, x509_token_config
from wlidd import cli
from wlidd import policy as policies
from wlidd.config import PolicyConfig, load_config, parse_identity_config, parse_token_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Fault, Upstreams
from wlidd.logs import configure_logging, reset_logging
from wlidd.policy import Policy
from wlidd.svid.load.source import CredentialSource
from wlidd.tokens.flows import Flow
from wlidd.tokens.manager import TokenSource
from wlidd.tokens.schedule import TRIGGERS
from wlidd.watch import CredentialWatcher

Lines = Callable[[], list[dict[str, Any]]]
NO_GROUP = "wlidd-test-no-such-group"
NO_USER = "wlidd-test-no-such-user"
RELOAD_LINES = (
    "logging reloaded",
    "policy reloaded",
    "sinks reloaded",
    "token source (re)started",
    "token source removed",
    "these changes take effect only after a restart",
    "config unchanged",
)


@pytest.fixture
def lines() -> Iterator[Lines]:
    """Every log line (JSON, info and up) written during the test, parsed: call it to read them so far."""
    out = io.StringIO()
    configure_logging("info", "json", out, journald=False)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    reset_logging()


def toml(value: Any) -> str:
    """A TOML value (inline tables for dicts) for the few types these configs hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    assert isinstance(value, dict), value
    return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"


def write(
    path: Path, files: FileSet, *, policy: str = "", tokens: dict[str, dict[str, Any]] | None = None, extra: str = ""
) -> Path:
    """A daemon config: the `default` identity over `files`, the Unix socket beside it, `tokens`, a
    [policy] body and `extra` TOML (whole tables) appended."""
    text = f"""
[identities.default]
source = "files"
cert = "{files.cert}"
key = "{files.key}"
bundle = "{files.bundle}"
mismatch_retries = 2
mismatch_retry_delay = 0.01
debounce = 0.02

[listeners.unix]
path = "{path.parent / "wlidd.sock"}"
"""
    for name, body in (tokens or {}).items():
        text += f"\n[tokens.{name}]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in body.items())
    if policy:
        text += f"\n[policy]\n{policy}\n"
    path.write_text(text + extra)
    return path


def daemon(path: Path) -> Daemon:
    return Daemon(load_config(path, {}), environ={}, config_path=path)


def client(d: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(d.socket_path)), base_url="http://wlidd")


def events(lines: list[dict[str, Any]], *names: str) -> list[str]:
    return [line["event"] for line in lines if line["event"] in names]


def unknown_warnings(lines: list[dict[str, Any]], **field: str) -> list[dict[str, Any]]:
    """The lines about a policy name that does not exist, for the one field given (user= or group=)."""
    return [line for line in lines if "does not exist" in line["event"] and field.items() <= line.items()]


# ---- 1: policy names that do not exist -----------------------------------------------------------------
def test_a_policy_user_or_group_that_does_not_exist_is_logged_at_warning(lines: Lines) -> None:
    """Both kinds, default and per-name rules alike: one warning each, naming the rule and the name."""
    config = PolicyConfig.model_validate(
        {
            "tokens": {"users": ["root", NO_USER], "groups": [NO_GROUP]},
            "credentials": {"users": [0]},
            "identity": {"default": {"groups": [NO_GROUP]}},
        }
    )
    policy = Policy.from_config(config)
    found = [
        (line["level"], line["policy"], line.get("user") or line.get("group"))
        for line in lines()
        if "does not exist" in line["event"]
    ]
    assert found == [
        ("warning", "policy.tokens", NO_USER),
        ("warning", "policy.tokens", NO_GROUP),
        ("warning", "policy.identity.default", NO_GROUP),
    ]
    assert policy.token("x").uids == {0} and not policy.token("x").gids  # the unknown names are left out


def test_wlidd_check_warns_about_each_policy_name_that_does_not_exist(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    body = f'[policy]\ntokens = {{ users = ["root"], groups = ["{NO_GROUP}"] }}\n'
    body += f'[policy.identity.default]\nusers = ["{NO_USER}", "root"]\n'
    config = cli_config(tmp_path, files, body)
    assert cli.main(["check", "--config", str(config)]) == 0  # a warning, not a failure
    printed = capsys.readouterr().out.splitlines()
    assert f"warning: policy.tokens: group '{NO_GROUP}' does not exist on this host; the rule ignores it" in "\n".join(
        printed
    )
    assert any(
        line.startswith(f"warning: policy.identity.default: user '{NO_USER}' does not exist") for line in printed
    )
    assert not any("'root'" in line for line in printed if line.startswith("warning: policy."))


async def test_unknown_policy_names_are_warned_at_start_and_each_reload_never_per_request(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, lines: Lines
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    path = write(
        tmp_path / "wlidd.toml", files, policy=f'credentials = {{ users = ["root"], groups = ["{NO_GROUP}"] }}'
    )
    d = daemon(path)
    async with in_background(d.run, d.stop), client(d) as c:
        for _ in range(5):
            assert (await c.get("/v1/credentials/default")).status_code == 200  # root: allowed
        assert len(unknown_warnings(lines(), group=NO_GROUP)) == 1
        await d.reload()
        await d.reload()
        for _ in range(5):
            assert (await c.get("/v1/credentials/default")).status_code == 200
    warned = unknown_warnings(lines(), group=NO_GROUP)
    assert [line["level"] for line in warned] == ["warning"] * 3  # start + two reloads, none per request


async def test_a_reload_resolves_policy_names_again_so_a_group_created_after_start_takes_effect(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's remedy for "a name that does not exist is ignored": create it, then reload. The
    config file is unchanged, so the policy was never resolved again: the new group admitted no one."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    path = write(
        tmp_path / "wlidd.toml", files, policy=f'credentials = {{ users = ["root"], groups = ["{NO_GROUP}"] }}'
    )
    d = daemon(path)
    async with in_background(d.run, d.stop):
        assert not d.policy.credentials("default").gids
        known = policies.group_id
        monkeypatch.setattr(policies, "group_id", lambda value: 4242 if value == NO_GROUP else known(value))  # groupadd
        await d.reload()
        assert d.policy.credentials("default").gids == {4242}
        assert d.api.policy is d.policy
    seen = lines()
    assert events(seen, *RELOAD_LINES) == ["policy reloaded"]
    assert len(unknown_warnings(seen, group=NO_GROUP)) == 1  # at start only: the reload found it


# ---- 2: a reload logs what changed, and says so when nothing did -------------------------------------------
async def test_each_reload_logs_only_what_changed_and_a_reload_that_changed_nothing_says_so(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, lines: Lines
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    path = tmp_path / "wlidd.toml"
    sink = f'\n[[identities.default.sinks]]\ndir = "{tmp_path / "out"}"\n'
    steps: list[tuple[str, Callable[[], object], list[str]]] = [
        ("same file", lambda: write(path, files), ["config unchanged"]),
        ("again", lambda: write(path, files), ["config unchanged"]),
        ("policy", lambda: write(path, files, policy='credentials = { users = ["root", 0] }'), ["policy reloaded"]),
        (
            "policy kept",
            lambda: write(path, files, policy='credentials = { users = ["root", 0] }'),
            ["config unchanged"],
        ),
        (
            "a sink",
            lambda: write(path, files, policy='credentials = { users = ["root", 0] }', extra=sink),
            ["sinks reloaded"],
        ),
        (
            "listeners",
            lambda: path.write_text(path.read_text().replace("wlidd.sock", "other.sock")),
            ["these changes take effect only after a restart"],
        ),
    ]
    write(path, files)
    d = daemon(path)
    async with in_background(d.run, d.stop):
        for step, change, expected in steps:
            before = len(lines())
            change()
            await d.reload()
            assert events(lines()[before:], *RELOAD_LINES) == expected, step


# ---- 3: every refresh names its real trigger -----------------------------------------------------------
def refreshes(lines: list[dict[str, Any]], source: str) -> list[str]:
    """The trigger of each fetch of `source`, in order ("token refreshed" and "token refresh failed")."""
    return [
        line["trigger"]
        for line in lines
        if line["event"] in ("token refreshed", "token refresh failed") and line.get("source") == source
    ]


async def test_a_refresh_for_a_rotated_svid_over_mtls_sts_says_svid_rotated(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, lines: Lines
) -> None:
    """The emulator's mTLS STS flow: the token is bound to the SVID, so a rotation refreshes it at once;
    that refresh was logged `trigger=scheduled`, like the first fetch."""
    first = ca.issue_svid("/ns/prod/sa/x509")
    files.put(first, ca.bundle_pem)
    d = daemon(write(tmp_path / "wlidd.toml", files, tokens={"gcp": x509_token_config(upstreams)}))
    async with in_background(d.run, d.stop):
        await wait_until(lambda: d.tokens["gcp"].current is not None)
        second = ca.issue_svid("/ns/prod/sa/x509")
        files.put(second)
        await wait_until(lambda: len(upstreams.mtls_leaves) >= 2 and len(refreshes(lines(), "gcp")) >= 2)
    assert upstreams.mtls_leaves[:2] == [first.leaf.serial_number, second.leaf.serial_number]
    assert refreshes(lines(), "gcp") == ["start", "svid_rotated"]
    requested = [line for line in lines() if line["event"] == "refresh requested"]
    assert [line["trigger"] for line in requested] == ["svid_rotated"]


class Wall:
    """The wall clock a source reads; the test moves it."""

    def __init__(self) -> None:
        import datetime as dt

        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> Any:
        return self.now

    def past(self, when: Any) -> None:
        import datetime as dt

        self.now = max(self.now, when + dt.timedelta(seconds=1))


async def test_the_loop_names_each_refresh_start_scheduled_or_retry(upstreams: Upstreams, lines: Lines) -> None:
    """The loop's first fetch is `start`, the planned one after a success `scheduled`, the next attempt
    after a failure `retry` (all three were `scheduled`); a planned refresh that fails is `scheduled`."""
    config = parse_token_config(metadata_token_config(upstreams))
    wall = Wall()
    source = TokenSource("mds", config, Flow("mds", config, None), clock=wall, rng=random.Random(1))

    async def step(count: int) -> None:
        """Move the wall clock past the planned attempt, wake the loop, wait for the `count`-th fetch."""
        assert source.next_refresh is not None
        wall.past(source.next_refresh)
        source._wake.set()  # the loop naps on real time: tell it the injected clock moved
        await wait_until(lambda: len(refreshes(lines(), "mds")) >= count)

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(source.run)
            await wait_until(lambda: len(refreshes(lines(), "mds")) >= 1)
            upstreams.inject("metadata", Fault(status=503, count=1))
            await step(2)  # the planned refresh fails
            await step(3)  # its retry succeeds
            await step(4)  # planned again
            tg.cancel_scope.cancel()
    finally:
        await source.flow.aclose()
    assert refreshes(lines(), "mds") == ["start", "scheduled", "retry", "scheduled"]


async def test_callers_name_their_fetches_cold_id_token_and_scoped_token(
    files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, lines: Lines
) -> None:
    """A first request fetches `cold` (was `request`); mints that need the federated token first name
    themselves (were `id-token`, `scoped-token`); every trigger logged is one TRIGGERS documents."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    watcher = CredentialWatcher(
        "default", CredentialSource("default", parse_identity_config(files.config().model_dump()))
    )
    await watcher.reload("start")
    made: list[TokenSource] = []

    def source(name: str, values: dict[str, Any]) -> TokenSource:
        config = parse_token_config(values)
        made.append(TokenSource(name, config, Flow(name, config, lambda: watcher.current), watcher=watcher))
        return made[-1]

    try:
        await source("mds", metadata_token_config(upstreams, on_demand=True)).get()
        await source("ids", x509_token_config(upstreams)).id_token("https://service.example.com")
        await source("scoped", x509_token_config(upstreams)).scoped_token(
            ("https://www.googleapis.com/auth/devstorage.read_only",)
        )
    finally:
        for each in made:
            await each.flow.aclose()
    seen = lines()
    assert (refreshes(seen, "mds"), refreshes(seen, "ids"), refreshes(seen, "scoped")) == (
        ["cold"],
        ["id_token"],
        ["scoped_token"],
    )
    logged = {line["trigger"] for line in seen if line["event"] in ("token refreshed", "refresh requested")}
    assert logged <= set(TRIGGERS), logged


async def test_a_source_a_reload_restarted_names_its_first_fetch_config(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams, lines: Lines
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    path = write(tmp_path / "wlidd.toml", files, tokens={"mds": metadata_token_config(upstreams)})
    d = daemon(path)
    async with in_background(d.run, d.stop):
        await wait_until(lambda: len(refreshes(lines(), "mds")) >= 1)
        write(path, files, tokens={"mds": metadata_token_config(upstreams, min_interval=0.5)})
        await d.reload()
        await wait_until(lambda: len(refreshes(lines(), "mds")) >= 2)
    assert refreshes(lines(), "mds") == ["start", "config"]
    assert "token source (re)started" in events(lines(), *RELOAD_LINES)
