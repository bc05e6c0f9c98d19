"""`…/token?scopes=a,b` on the metadata API (issue 15 item 2): a scope the token's scopes cover is served,
only scopes nothing covers are refused (400 naming them); a source that impersonates a service account
mints a token with exactly the scopes asked for (IAM generateAccessToken), cached per scope set, behind
the guards of every upstream call."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import FileSet, in_background
from tests.test_tokens import metadata_token_config, x509_token_config
from wlidd.api.messages import Request, Response
from wlidd.api.metadata_scopes import (
    CLOUD_PLATFORM,
    MAX_SCOPES,
    SIGN_IN_SCOPES,
    covering_scope,
    parse_scopes,
    uncovered_scopes,
)
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Fault, Upstreams
from wlidd.errors import InvalidValue
from wlidd.tokens.limits import ScopedLimits
from wlidd.tokens.scoped import ScopedTokens

EMAIL = "app@demo-project.iam.gserviceaccount.com"
AUTH = "https://www.googleapis.com/auth/"
READ_ONLY = AUTH + "devstorage.read_only"
DRIVE = AUTH + "drive"
USERINFO_EMAIL = AUTH + "userinfo.email"
# Terraform's Google provider asks exactly these when no `scopes` is configured (DefaultClientScopes in
# hashicorp/terraform-provider-google's transport config), through x/oauth2's ComputeTokenSource on GCE.
TERRAFORM_SCOPES = (CLOUD_PLATFORM, USERINFO_EMAIL)
TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"
FLAVOR = {"Metadata-Flavor": "Google"}


def sha(text: str) -> str:
    """Tokens are compared by digest: a failing assertion must not print one."""
    return hashlib.sha256(text.encode()).hexdigest()


# ---- the coverage rule ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("granted", "scope", "by"),
    [
        ([CLOUD_PLATFORM], READ_ONLY, CLOUD_PLATFORM),
        ([CLOUD_PLATFORM], AUTH + "devstorage.full_control", CLOUD_PLATFORM),
        ([CLOUD_PLATFORM], AUTH + "pubsub", CLOUD_PLATFORM),
        ([CLOUD_PLATFORM], AUTH + "bigquery.readonly", CLOUD_PLATFORM),
        ([CLOUD_PLATFORM], AUTH + "sqlservice.login", CLOUD_PLATFORM),
        ([CLOUD_PLATFORM], AUTH + "cloud-platform.read-only", CLOUD_PLATFORM),
        ([CLOUD_PLATFORM], CLOUD_PLATFORM, CLOUD_PLATFORM),
        ([AUTH + "bigquery"], AUTH + "bigquery.readonly", AUTH + "bigquery"),
        ([AUTH + "devstorage.full_control"], READ_ONLY, AUTH + "devstorage.full_control"),
        ([AUTH + "devstorage.read_write"], READ_ONLY, AUTH + "devstorage.read_write"),
        ([AUTH + "drive"], AUTH + "drive.readonly", AUTH + "drive"),
    ],
)
def test_a_scope_is_covered_by_the_scope_that_grants_it(granted: list[str], scope: str, by: str) -> None:
    assert covering_scope(granted, scope) == by


@pytest.mark.parametrize(
    ("granted", "scope"),
    [
        ([CLOUD_PLATFORM], DRIVE),  # Google Workspace: BigQuery's Drive tables need it besides cloud-platform
        ([CLOUD_PLATFORM], AUTH + "drive.readonly"),
        ([CLOUD_PLATFORM], AUTH + "spreadsheets"),
        ([CLOUD_PLATFORM], AUTH + "gmail.send"),
        ([CLOUD_PLATFORM], AUTH + "admin.directory.user"),
        ([CLOUD_PLATFORM], AUTH + "userinfo.email"),  # sign-in scopes
        ([CLOUD_PLATFORM], "openid"),
        ([CLOUD_PLATFORM], "email"),
        ([CLOUD_PLATFORM], "https://mail.google.com/"),
        ([CLOUD_PLATFORM], "https://example.com/other"),
        ([CLOUD_PLATFORM], AUTH),
        ([CLOUD_PLATFORM], AUTH + "a/b"),
        ([AUTH + "cloud-platform.read-only"], AUTH + "pubsub"),
        ([READ_ONLY], AUTH + "devstorage.full_control"),
        ([AUTH + "bigquery.readonly"], AUTH + "bigquery"),
    ],
)
def test_scopes_nothing_granted_grants_are_not_covered(granted: list[str], scope: str) -> None:
    assert covering_scope(granted, scope) is None


@pytest.mark.parametrize(
    "name",
    [
        # Workspace, marketing and consumer APIs that list only their own scopes in Google's scope table
        "cloud_search",
        "cloud_search.query",
        "tagmanager.readonly",
        "tagmanager.edit.containers",
        "datastudio",
        "datastudio.readonly",
        "chromewebstore",
        "chromewebstore.readonly",
        "postmaster.readonly",
        "dfareporting",
        "admob.readonly",
        "adsensehost",
        "display-video-mediaplanning",
        "chrome.management.policy",
        "business.manage",
    ],
)
def test_cloud_platform_does_not_cover_workspace_and_consumer_scopes(name: str) -> None:
    assert covering_scope([CLOUD_PLATFORM], AUTH + name) is None


MADE_UP = [
    "cloud-platformX",  # not cloud-platform, nor any other well-formed scope name
    "cloud-platformx",  # a variant of cloud-platform: only cloud-platform and .read-only are its scopes
    "cloud-platform.admin",
    "cloud-platform-extra",
    "devstorage.read_only.extra",  # Cloud Storage has exactly read_only, read_write, full_control
    "devstorage.readonly",
    "devstorage2.read",
    "Pubsub",
    "pubsub..admin",
    "pubsub.",
    ".pubsub",
    "pub sub",
]


def test_only_well_formed_scope_names_are_covered_by_cloud_platform() -> None:
    granted = [CLOUD_PLATFORM, AUTH + "devstorage.full_control"]
    covered = {name: covering_scope(granted, AUTH + name) for name in MADE_UP}
    assert covered == dict.fromkeys(MADE_UP)  # none: each is covered by itself only
    assert all(covering_scope([AUTH + name], AUTH + name) == AUTH + name for name in MADE_UP)
    for name in ("pubsub", "bigquery.readonly", "cloud-platform.read-only", "cloud-identity.groups", "trace.append"):
        assert covering_scope([CLOUD_PLATFORM], AUTH + name) == CLOUD_PLATFORM, name  # real names still are


def test_sign_in_scopes_are_never_uncovered_and_the_rest_still_is() -> None:
    asked = [*sorted(SIGN_IN_SCOPES), CLOUD_PLATFORM, DRIVE, READ_ONLY]
    assert uncovered_scopes([CLOUD_PLATFORM], asked) == [DRIVE]
    assert uncovered_scopes([READ_ONLY], list(TERRAFORM_SCOPES)) == [CLOUD_PLATFORM]
    assert uncovered_scopes([CLOUD_PLATFORM], list(TERRAFORM_SCOPES)) == []


def test_asked_scopes_are_split_at_commas_and_spaces_each_once() -> None:
    assert parse_scopes([f"{READ_ONLY},{DRIVE}", f"{DRIVE} {CLOUD_PLATFORM}", ""]) == (READ_ONLY, DRIVE, CLOUD_PLATFORM)
    with pytest.raises(InvalidValue, match=f"at most {MAX_SCOPES}"):
        parse_scopes([",".join(f"{AUTH}s{i}" for i in range(MAX_SCOPES + 1))])
    with pytest.raises(InvalidValue, match="at most 512"):
        parse_scopes([AUTH + "x" * 600])
    with pytest.raises(InvalidValue, match="printable ASCII"):
        parse_scopes([AUTH + "caf\u00e9"])


# ---- a source that cannot mint: the coverage rule ------------------------------------------------
@pytest.fixture
async def metadata_daemon(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> AsyncIterator[Daemon]:
    files.put(ca.issue_svid(), ca.bundle_pem)
    token = metadata_token_config(upstreams, metadata={"url": upstreams.metadata_url, "scopes": [CLOUD_PLATFORM]})
    d = Daemon(_config(tmp_path, files, token))
    async with in_background(d.run, d.stop):
        yield d


def _config(tmp_path: Path, files: FileSet, token: dict[str, Any]) -> Config:
    return Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"gcp": token},
            "listeners": {
                "unix": {"path": str(tmp_path / "wlidd.sock")},
                "metadata": {"address": "127.0.0.1:0", "token": "gcp", "email": EMAIL, "project_id": "demo-project"},
            },
        }
    )


def _client(d: Daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.metadata_port}", headers=FLAVOR, timeout=30)


async def test_covered_scopes_get_the_token_and_uncovered_ones_are_refused_by_name(metadata_daemon: Daemon) -> None:
    async with _client(metadata_daemon) as c:
        storage = await c.get(TOKEN, params={"scopes": f"{READ_ONLY},{AUTH}devstorage.read_write"})
        mixed = await c.get(TOKEN, params={"scopes": f"{CLOUD_PLATFORM},{DRIVE},openid"})
        too_many = await c.get(TOKEN, params={"scopes": ",".join(f"{AUTH}s{i}" for i in range(MAX_SCOPES + 1))})
    token = metadata_daemon.tokens["gcp"].current
    assert token is not None
    assert storage.status_code == 200 and sha(storage.json()["access_token"]) == sha(token.value)
    assert mixed.status_code == 400 and mixed.headers["metadata-flavor"] == "Google"
    assert f"scope {DRIVE} is not covered by token 'gcp', which carries {CLOUD_PLATFORM}" in mixed.text
    assert "openid" not in mixed.text.split(" is not covered")[0]  # a sign-in scope is never refused
    assert too_many.status_code == 400 and "bad scopes" in too_many.text


async def test_terraforms_default_scopes_get_the_token_of_a_source_that_cannot_mint(metadata_daemon: Daemon) -> None:
    """Terraform asks cloud-platform + userinfo.email; the token carries cloud-platform. The real metadata
    server ignores scopes; wlidd serves the token (userinfo.email adds no API access), as it does a
    request for sign-in scopes alone."""
    async with _client(metadata_daemon) as c:
        terraform = await c.get(TOKEN, params={"scopes": ",".join(TERRAFORM_SCOPES)})
        sign_in = await c.get(TOKEN, params={"scopes": "openid email profile " + AUTH + "userinfo.profile"})
        made_up = await c.get(TOKEN, params={"scopes": f"{CLOUD_PLATFORM},{AUTH}cloud-platformX"})
    token = metadata_daemon.tokens["gcp"].current
    assert token is not None
    assert terraform.status_code == 200 and sha(terraform.json()["access_token"]) == sha(token.value)
    assert sign_in.status_code == 200 and sha(sign_in.json()["access_token"]) == sha(token.value)
    assert made_up.status_code == 400 and f"scope {AUTH}cloud-platformX is not covered" in made_up.text


CLIENT = """
import hashlib, json, google.auth.compute_engine
from google.auth.transport.requests import Request
credentials = google.auth.compute_engine.Credentials(scopes=["https://www.googleapis.com/auth/devstorage.read_only"])
credentials.refresh(Request())
print(json.dumps({"sha256": hashlib.sha256(credentials.token.encode()).hexdigest(),
                  "email": credentials.service_account_email}))
"""


async def _google_auth(d: Daemon, home: Path) -> dict[str, Any]:
    """Unmodified google-auth's compute_engine credentials with scopes devstorage.read_only, in its own
    interpreter (it reads GCE_METADATA_HOST at import); the token's digest and the account's email."""
    host = f"127.0.0.1:{d.metadata_port}"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "GCE_METADATA_HOST": host,
        "GCE_METADATA_IP": host,
        "GCE_METADATA_MTLS_MODE": "none",
    }
    result = await anyio.run_process([sys.executable, "-c", CLIENT], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    seen: dict[str, Any] = json.loads(result.stdout)
    return seen


async def test_unmodified_google_auth_with_a_storage_scope_gets_the_cloud_platform_token(
    metadata_daemon: Daemon, tmp_path: Path
) -> None:
    seen = await _google_auth(metadata_daemon, tmp_path / "home")
    token = metadata_daemon.tokens["gcp"].current
    assert token is not None and seen == {"sha256": sha(token.value), "email": EMAIL}


# ---- a source that impersonates: least privilege ----------------------------------------------------
class Iam:
    """The scopes of each generateAccessToken call the emulator answers, and the digest of what it issued."""

    def __init__(self, upstreams: Upstreams) -> None:
        self.asked: list[list[str]] = []
        self.issued: dict[str, list[str]] = {}  # token digest → its scopes
        original: Callable[[Request], Awaitable[Response]] = upstreams._iam

        async def recording(request: Request) -> Response:
            response = await original(request)
            if request.path.endswith(":generateAccessToken") and response.status == 200:
                scopes = json.loads(request.body)["scope"]
                self.asked.append(scopes)
                self.issued[sha(json.loads(response.body)["accessToken"])] = scopes
            return response

        upstreams._iam = recording  # type: ignore[method-assign]  (looked up per request by _https/_mtls)

    def minted(self, scopes: list[str]) -> int:
        return sum(1 for asked in self.asked if asked == scopes)


@pytest.fixture
async def impersonating(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> AsyncIterator[tuple[Daemon, Upstreams, Iam]]:
    iam = Iam(upstreams)
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(_config(tmp_path, files, x509_token_config(upstreams)))
    async with in_background(d.run, d.stop):
        async with _client(d) as c:  # the source's own token first
            assert (await c.get(TOKEN)).status_code == 200
        yield d, upstreams, iam


async def test_an_impersonating_source_mints_exactly_the_scopes_asked_for(
    impersonating: tuple[Daemon, Upstreams, Iam],
) -> None:
    d, _, iam = impersonating
    async with _client(d) as c:
        narrow = await c.get(TOKEN, params={"scopes": READ_ONLY})
        again = await c.get(TOKEN, params={"scopes": READ_ONLY})
        drive = await c.get(TOKEN, params={"scopes": f"{DRIVE},{READ_ONLY}"})
        same_set = await c.get(TOKEN, params={"scopes": f"{READ_ONLY} {DRIVE}"})
        own = await c.get(TOKEN, params={"scopes": CLOUD_PLATFORM})
    assert [r.status_code for r in (narrow, again, drive, same_set, own)] == [200] * 5
    assert iam.issued[sha(narrow.json()["access_token"])] == [READ_ONLY]
    assert sha(again.json()["access_token"]) == sha(narrow.json()["access_token"])  # cached per scope set
    assert iam.issued[sha(drive.json()["access_token"])] == sorted([DRIVE, READ_ONLY])
    assert sha(same_set.json()["access_token"]) == sha(drive.json()["access_token"])
    token = d.tokens["gcp"].current
    assert token is not None and sha(own.json()["access_token"]) == sha(token.value)  # its own scopes: its token
    assert iam.asked == [[CLOUD_PLATFORM], [READ_ONLY], sorted([DRIVE, READ_ONLY])]
    assert 0 < narrow.json()["expires_in"] <= 3600


async def test_an_impersonating_source_mints_terraforms_default_scopes_userinfo_email_included(
    impersonating: tuple[Daemon, Upstreams, Iam],
) -> None:
    d, upstreams, iam = impersonating
    async with _client(d) as c:
        minted = await c.get(TOKEN, params={"scopes": ",".join(TERRAFORM_SCOPES)})
    assert minted.status_code == 200 and iam.issued[sha(minted.json()["access_token"])] == sorted(TERRAFORM_SCOPES)
    body = {"error": {"code": 400, "message": "Invalid scope", "status": "INVALID_ARGUMENT"}}
    upstreams.inject("iam", Fault(status=400, body=body, count=1))  # an IAM that would refuse userinfo.email
    async with _client(d) as c:
        refused = await c.get(TOKEN, params={"scopes": f"{CLOUD_PLATFORM},openid"})
    token = d.tokens["gcp"].current
    assert token is not None  # the rest is covered by the token's own scopes: that token, not a 400
    assert refused.status_code == 200 and sha(refused.json()["access_token"]) == sha(token.value)


async def test_unmodified_google_auth_gets_a_least_privilege_token_from_an_impersonating_source(
    impersonating: tuple[Daemon, Upstreams, Iam], tmp_path: Path
) -> None:
    d, _, iam = impersonating
    seen = await _google_auth(d, tmp_path / "home")
    assert iam.issued[seen["sha256"]] == [READ_ONLY] and seen["email"] == EMAIL


async def test_concurrent_requests_for_a_new_scope_set_share_one_mint_spaced_and_counted(
    impersonating: tuple[Daemon, Upstreams, Iam],
) -> None:
    d, _, iam = impersonating
    source = d.tokens["gcp"]
    calls_before = source.upstream_calls
    answers: list[httpx.Response] = []
    async with _client(d) as c:

        async def ask() -> None:
            answers.append(await c.get(TOKEN, params={"scopes": READ_ONLY}))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(ask)
    assert [a.status_code for a in answers] == [200] * 8
    assert len({sha(a.json()["access_token"]) for a in answers}) == 1
    assert iam.minted([READ_ONLY]) == 1 and source.upstream_calls == calls_before + 1
    labels = {"source": "gcp", "kind": "scoped_token"}
    assert d.metrics.registry.get_sample_value("wlidd_token_upstream_calls_total", labels) == 1


async def test_mints_for_new_scope_sets_are_rate_limited_while_minted_sets_are_still_served(
    impersonating: tuple[Daemon, Upstreams, Iam],
) -> None:
    d, _, iam = impersonating
    burst = ScopedLimits().caller_burst
    async with _client(d) as c:
        first = [await c.get(TOKEN, params={"scopes": f"{AUTH}gmail.s{i}"}) for i in range(burst)]
        over = await c.get(TOKEN, params={"scopes": f"{AUTH}gmail.s{burst}"})
        cached = await c.get(TOKEN, params={"scopes": f"{AUTH}gmail.s0"})
    assert [r.status_code for r in first] == [200] * burst
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
    assert over.headers["metadata-flavor"] == "Google" and "scope sets faster than" in over.text
    assert cached.status_code == 200 and len(iam.asked) == 1 + burst


async def test_a_failed_mint_backs_off_and_a_covered_request_falls_back_to_the_token(
    impersonating: tuple[Daemon, Upstreams, Iam],
) -> None:
    d, upstreams, iam = impersonating
    upstreams.inject("iam", Fault(status=503, retry_after="30"))
    async with _client(d) as c:
        uncovered = await c.get(TOKEN, params={"scopes": DRIVE})
        held = await c.get(TOKEN, params={"scopes": AUTH + "gmail.send"})
        covered = await c.get(TOKEN, params={"scopes": READ_ONLY})
    assert uncovered.status_code == 503 and f"no token with scopes {DRIVE}" in uncovered.text
    assert held.status_code == 503 and "scoped tokens are backing off" in held.text
    assert upstreams.calls["iam"] == 2  # the source's own token, then the one failed mint: nothing while held
    token = d.tokens["gcp"].current
    assert token is not None and covered.status_code == 200 and sha(covered.json()["access_token"]) == sha(token.value)
    assert iam.asked == [[CLOUD_PLATFORM]]


async def test_a_scope_set_refused_by_iam_is_a_400_and_is_not_asked_again(
    impersonating: tuple[Daemon, Upstreams, Iam],
) -> None:
    d, upstreams, _ = impersonating
    body = {"error": {"code": 400, "message": "Invalid scope", "status": "INVALID_ARGUMENT"}}
    upstreams.inject("iam", Fault(status=400, body=body, count=1))
    async with _client(d) as c:
        refused = await c.get(TOKEN, params={"scopes": DRIVE})
        again = await c.get(TOKEN, params={"scopes": DRIVE})
        other = await c.get(TOKEN, params={"scopes": AUTH + "gmail.send"})
    assert refused.status_code == 400 and "Invalid scope" in refused.text
    assert again.status_code == 400 and "refused for these scopes" in again.text
    assert other.status_code == 200  # a permanent refusal holds its own set only
    assert upstreams.calls["iam"] == 3


async def test_the_scoped_token_cache_keeps_the_most_recently_used_sets(
    impersonating: tuple[Daemon, Upstreams, Iam],
) -> None:
    d, _, iam = impersonating
    source = d.tokens["gcp"]
    limits = ScopedLimits(cache_size=2, mints_burst=100)
    source._scoped = ScopedTokens(limits, source.config, source.monotonic())
    sets = [(f"{AUTH}a",), (f"{AUTH}b",), (f"{AUTH}a",), (f"{AUTH}c",), (f"{AUTH}b",)]
    for scopes in sets:
        await source.scoped_token(scopes)
    assert list(source._scoped.cache) == [frozenset({f"{AUTH}c"}), frozenset({f"{AUTH}b"})]
    assert iam.asked[1:] == [[f"{AUTH}a"], [f"{AUTH}b"], [f"{AUTH}c"], [f"{AUTH}b"]]  # b was dropped


async def test_a_minted_token_is_not_served_past_its_expiry(impersonating: tuple[Daemon, Upstreams, Iam]) -> None:
    d, _, iam = impersonating
    source = d.tokens["gcp"]
    first = await source.scoped_token((READ_ONLY,))
    assert first.lifetime <= 3600 and first.seconds_left(dt.datetime.now(dt.UTC)) > 3000
    assert source._scoped is not None
    expired = dataclasses.replace(first, expire_time=dt.datetime.now(dt.UTC))
    source._scoped.cache[frozenset({READ_ONLY})] = expired  # as if its hour had passed
    second = await source.scoped_token((READ_ONLY,))
    assert sha(second.value) != sha(first.value) and iam.minted([READ_ONLY]) == 2
