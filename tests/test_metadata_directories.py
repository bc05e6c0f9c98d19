"""The metadata API's directories answer as the real GCE metadata server does (issue 15 item 1): text
listings, 301 from the slash-less form, `?recursive=true` as camelCase JSON without tokens, `alt=text`
and `alt=json` (wlidd.api.metadata has the sources)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import httpx
import pytest

from tests import test_metadata
from tests.test_metadata import EMAIL
from wlidd.api.messages import Request
from wlidd.api.metadata import MetadataApi
from wlidd.api.metadata_tree import METADATA_ROUTE_TEMPLATES, metadata_route_template
from wlidd.api.peers import Peer
from wlidd.config import MetadataListenerConfig, PolicyConfig, parse_token_config
from wlidd.daemon import Daemon
from wlidd.policy import Policy
from wlidd.tokens.flows import Flow
from wlidd.tokens.manager import TokenSource

daemon = test_metadata.daemon  # the same fixture: a daemon with the metadata listener, a metadata-flow token
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
FLAVOR = {"Metadata-Flavor": "Google"}
V1 = "/computeMetadata/v1/"
ACCOUNTS = V1 + "instance/service-accounts/"
ACCOUNT = {"aliases": ["default"], "email": EMAIL, "scopes": [CLOUD_PLATFORM]}


@pytest.fixture
async def mds(daemon: Daemon) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the metadata listener that sends the flavor header and follows no redirect."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.metadata_port}", headers=FLAVOR) as c:
        yield c


async def test_every_directory_is_a_text_listing_of_what_is_served(mds: httpx.AsyncClient) -> None:
    listings = {
        "/": "computeMetadata/\n",
        "/computeMetadata/": "v1/\n",
        V1: "instance/\nproject/\nuniverse/\n",
        V1 + "instance/": "service-accounts/\n",
        V1 + "project/": "numeric-project-id\nproject-id\n",
        V1 + "universe/": "universe-domain\n",
        ACCOUNTS: f"default/\n{EMAIL}/\n",
        ACCOUNTS + "default/": "aliases\nemail\nidentity\nscopes\ntoken\n",
        ACCOUNTS + f"{EMAIL}/": "aliases\nemail\nidentity\nscopes\ntoken\n",
    }
    for path, listing in listings.items():
        response = await mds.get(path)
        assert (response.status_code, response.text) == (200, listing), path
        assert response.headers["content-type"] == "application/text"
        assert response.headers["metadata-flavor"] == "Google"


async def test_what_a_listing_names_is_served_and_nothing_else(mds: httpx.AsyncClient) -> None:
    """Walking the tree from the listings (as gcloud walks `service-accounts/`) reaches only answers."""
    pending, values = [V1], {}
    while pending:
        path = pending.pop()
        for entry in (await mds.get(path)).text.splitlines():
            if entry.endswith("/"):
                pending.append(path + entry)
            elif entry not in ("token", "identity"):
                response = await mds.get(path + entry)
                assert response.status_code == 200, path + entry
                values[path + entry] = response.text
    assert values[ACCOUNTS + "default/email"] == EMAIL == values[ACCOUNTS + f"{EMAIL}/email"]
    assert values[ACCOUNTS + "default/scopes"] == CLOUD_PLATFORM + "\n"
    assert values[V1 + "project/numeric-project-id"] == "123456789"
    assert len(values) == 9  # 3 values of each of the 2 accounts, 2 of the project, 1 of the universe
    for path in (  # and nothing else
        ACCOUNTS + "default/email/",
        V1 + "instance/hostname",
        V1 + "instance/attributes/",
        "//computeMetadata/v1/",
        V1 + "project//project-id",
        ACCOUNTS + "default/token/",
    ):
        response = await mds.get(path)
        assert (response.status_code, response.headers["metadata-flavor"]) == (404, "Google"), path
    other = await mds.get(ACCOUNTS + "someone@else.example/email")
    assert other.status_code == 404 and "service account 'someone@else.example' is not served here" in other.text


async def test_a_directory_without_its_slash_is_a_301_to_it_as_on_the_real_server(
    mds: httpx.AsyncClient, daemon: Daemon
) -> None:
    host = f"127.0.0.1:{daemon.metadata_port}"
    for path in (
        "/computeMetadata",
        "/computeMetadata/v1",
        "/computeMetadata/v1/instance",
        "/computeMetadata/v1/project",
        "/computeMetadata/v1/universe",
        "/computeMetadata/v1/instance/service-accounts",
        "/computeMetadata/v1/instance/service-accounts/default",
        f"/computeMetadata/v1/instance/service-accounts/{EMAIL}",
    ):
        response = await mds.get(path)
        assert response.status_code == 301, path
        assert response.headers["location"] == f"http://{host}{path}/"
        assert response.headers["content-type"] == "text/html" and response.text == f"{path}/\n"
        assert response.headers["metadata-flavor"] == "Google"
    kept = await mds.get(ACCOUNTS + "default", params={"recursive": "true"})
    assert kept.headers["location"] == f"http://{host}{ACCOUNTS}default/?recursive=true"
    relative = await mds.get(V1 + "instance", headers={"Host": "bad host\\name"})
    assert relative.headers["location"] == V1 + "instance/"


async def test_the_node_detection_probe_gets_a_flavored_2xx_after_the_redirect(mds: httpx.AsyncClient) -> None:
    """gcp-metadata's isAvailable(): GET <base>/computeMetadata/v1/instance with the flavor header, redirects
    followed (fetch), on GCE iff the answer is 2xx with `Metadata-Flavor: Google` (and, before 6.1, a body)."""
    response = await mds.get("/computeMetadata/v1/instance", follow_redirects=True)
    assert response.status_code == 200 and response.headers["metadata-flavor"] == "Google"
    assert response.text == "service-accounts/\n"
    assert [r.status_code for r in response.history] == [301]


async def test_recursive_answers_are_camel_case_json_without_tokens(mds: httpx.AsyncClient) -> None:
    accounts = {"default": ACCOUNT, EMAIL: ACCOUNT}
    project = {"numericProjectId": 123456789, "projectId": "demo-project"}
    expected = {
        V1: {
            "instance": {"serviceAccounts": accounts},
            "project": project,
            "universe": {"universeDomain": "googleapis.com"},
        },
        V1 + "instance/": {"serviceAccounts": accounts},
        ACCOUNTS: accounts,
        ACCOUNTS + "default/": ACCOUNT,
        V1 + "project/": project,
    }
    for path, document in expected.items():
        for query in ({"recursive": "true"}, {"recursive": "TRUE", "alt": "json"}):
            response = await mds.get(path, params=query)
            assert response.status_code == 200, (path, query)
            assert response.headers["content-type"] == "application/json"
            assert response.json() == document, (path, query)
            assert "access_token" not in response.text and "token" not in response.json()


async def test_recursive_alt_text_is_one_path_value_line_per_value(mds: httpx.AsyncClient) -> None:
    response = await mds.get(V1, params={"recursive": "true", "alt": "text"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/text"
    assert response.text.splitlines() == [
        "instance/service-accounts/default/aliases default",
        f"instance/service-accounts/default/email {EMAIL}",
        f"instance/service-accounts/default/scopes {CLOUD_PLATFORM}",
        f"instance/service-accounts/{EMAIL}/aliases default",
        f"instance/service-accounts/{EMAIL}/email {EMAIL}",
        f"instance/service-accounts/{EMAIL}/scopes {CLOUD_PLATFORM}",
        "project/numeric-project-id 123456789",
        "project/project-id demo-project",
        "universe/universe-domain googleapis.com",
    ]


async def test_values_answer_alt_json_and_ignore_recursive(mds: httpx.AsyncClient) -> None:
    email = await mds.get(ACCOUNTS + "default/email", params={"alt": "json"})
    assert email.headers["content-type"] == "application/json" and email.json() == EMAIL
    scopes = await mds.get(ACCOUNTS + "default/scopes", params={"alt": "json"})
    assert scopes.json() == [CLOUD_PLATFORM]
    number = await mds.get(V1 + "project/numeric-project-id", params={"alt": "json"})
    assert number.json() == 123456789
    plain = await mds.get(ACCOUNTS + "default/email", params={"recursive": "true", "alt": "text"})
    assert (plain.headers["content-type"], plain.text) == ("application/text", EMAIL)
    listing = await mds.get(V1 + "instance/", params={"alt": "json"})
    assert listing.text == "service-accounts/\n"  # a plain listing is always text
    bad = await mds.get(ACCOUNTS + "default/email", params={"alt": "xml"})
    assert bad.status_code == 400 and "alt must be json or text" in bad.text


async def test_the_identity_entry_is_listed_only_where_id_tokens_can_be_minted() -> None:
    config = parse_token_config(
        {"flow": "x509-sts", "identity": "default", "sts": {"audience": "//iam.googleapis.com/x"}}
    )
    source = TokenSource("x", config, Flow("x", config))
    api = MetadataApi(
        MetadataListenerConfig(token="x", email=EMAIL),
        source,
        Policy.from_config(PolicyConfig()),
        lambda: dt.datetime.now(dt.UTC),
    )
    headers = (("metadata-flavor", "Google"),)
    listing = await api(Request("GET", ACCOUNTS + "default/", {}, headers, b"", Peer(), "metadata"))
    assert (listing.status, listing.body) == (200, b"aliases\nemail\nscopes\ntoken\n")
    identity = await api(Request("GET", ACCOUNTS + "default/identity", {"audience": ["a"]}, headers, b"", Peer(), "m"))
    assert identity.status == 404 and b"ID tokens are not available" in identity.body


def test_the_route_templates_of_directories_are_a_fixed_set() -> None:
    for path in ("/computeMetadata/v1/", "/computeMetadata/v1/instance", ACCOUNTS, ACCOUNTS.rstrip("/")):
        assert metadata_route_template(path) == path
    template = "/computeMetadata/v1/instance/service-accounts/{account}"
    assert metadata_route_template(ACCOUNTS + "x@y") == template
    assert metadata_route_template(ACCOUNTS + "x@y/") == template + "/"
    assert metadata_route_template(ACCOUNTS + "default/token") == template + "/token"
    assert metadata_route_template(ACCOUNTS + "default/bogus") == "other"
    assert metadata_route_template("/computeMetadata/v1/instance/random-1234") == "other"
    for path in (*listings_and_values(), "/a", "//", ACCOUNTS + "%2e%2e/", ACCOUNTS + "x/y/z", V1 + "project/x"):
        assert metadata_route_template(path) in METADATA_ROUTE_TEMPLATES | {"other"}, path


def listings_and_values() -> list[str]:
    """Every path the tree serves, directories with and without their slash."""
    directories = [
        "/computeMetadata",
        V1,
        V1 + "instance",
        V1 + "project",
        V1 + "universe",
        ACCOUNTS,
        ACCOUNTS + "default",
    ]
    leaves = [ACCOUNTS + f"default/{leaf}" for leaf in ("aliases", "email", "identity", "scopes", "token")]
    leaves += [V1 + "project/project-id", V1 + "project/numeric-project-id", V1 + "universe/universe-domain"]
    return [d.rstrip("/") + s for d in directories for s in ("", "/")] + leaves
