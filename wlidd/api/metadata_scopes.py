"""The scope rule of the metadata API's `…/token?scopes=a,b` (pure: no I/O): which scope a token carries
covers a scope a caller asks for (`covering_scope`, `uncovered_scopes`: Google's scope table and the Compute
Engine service account rules, sources at each constant), and what `?scopes=` may hold (`parse_scopes`).
The sign-in scopes (SIGN_IN_SCOPES) are never refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from wlidd.errors import InvalidValue

GOOGLE_AUTH = "https://www.googleapis.com/auth/"


CLOUD_PLATFORM = GOOGLE_AUTH + "cloud-platform"


# Scope families under GOOGLE_AUTH (the name up to its first ".") that cloud-platform does not grant:
# Google Workspace, advertising, Play and consumer APIs, which list only their own scopes in Google's
# scope table (https://developers.google.com/identity/protocols/oauth2/scopes; e.g. BigQuery's Drive
# tables need the drive scope besides cloud-platform: https://cloud.google.com/bigquery/docs/query-drive-data),
# and the sign-in family userinfo (see SIGN_IN_SCOPES). An API whose entry in that table lists
# cloud-platform (Cloud Identity, Firebase, every Cloud product) is not here.
NOT_CLOUD_FAMILIES = frozenset(
    {
        # sign-in
        "userinfo",
        "plus",
        # Google Workspace
        "admin",
        "apps",
        "appsmarketplace",
        "calendar",
        "chat",
        "classroom",
        "cloud_search",
        "contacts",
        "directory",
        "documents",
        "drive",
        "ediscovery",
        "forms",
        "gmail",
        "groups",
        "keep",
        "meetings",
        "postmaster",
        "presentations",
        "script",
        "spreadsheets",
        "tasks",
        "user",
        "workspace",
        # Chrome, Android and Play
        "androidenterprise",
        "androidmanagement",
        "androidpublisher",
        "chrome",
        "chromewebstore",
        "games",
        "playdeveloperreporting",
        "playintegrity",
        "verifiedaccess",
        # advertising, analytics and marketing
        "adexchange",
        "admob",
        "adsense",
        "adsensehost",
        "adwords",
        "analytics",
        "authorized-buyers-marketplace",
        "content",
        "datastudio",
        "ddmconversions",
        "dfareporting",
        "dfatrafficking",
        "dfp",
        "display-video",
        "display-video-mediaplanning",
        "display-video-user-management",
        "doubleclickbidmanager",
        "doubleclicksearch",
        "manufacturercenter",
        "realtime-bidding",
        "tagmanager",
        # consumer and other non-Cloud APIs
        "blogger",
        "books",
        "business",
        "fitness",
        "homegraph",
        "indexing",
        "photoslibrary",
        "photospicker",
        "sdm",
        "siteverification",
        "streetviewpublish",
        "tables",
        "travelpartner",
        "webmasters",
        "youtube",
        "youtubepartner",
        "youtubepartner-channel-audit",
        "yt-analytics",
        "yt-analytics-monetary",
    }
)


# The sign-in scopes: they add identity claims to a token (the account's email through tokeninfo and
# userinfo) and grant no API access. They never cause a refusal (`uncovered_scopes`): Terraform's Google
# provider asks cloud-platform + userinfo.email by default (its DefaultClientScopes), x/oauth2's
# ComputeTokenSource sends them as ?scopes=, and the real metadata server ignores scopes altogether.
SIGN_IN_SCOPES = frozenset(
    {"openid", "email", "profile", GOOGLE_AUTH + "userinfo.email", GOOGLE_AUTH + "userinfo.profile"}
)


# A scope name under GOOGLE_AUTH: "."-separated segments of lower-case letters, digits, "_" and "-"
# (every name in Google's scope table has this form: `devstorage.read_only`, `yt-analytics.readonly`,
# `cloud_search.query`).
SCOPE_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


# Families whose every scope wlidd knows (Google's scope table): a name in such a family, or one that
# begins with its name (`cloud-platformx`, `devstorage2.read`), is a scope only if it is listed here;
# anything else is a made-up name, covered by nothing but itself.
CLOSED_FAMILIES: Mapping[str, frozenset[str]] = {
    "cloud-platform": frozenset({"cloud-platform", "cloud-platform.read-only"}),
    "devstorage": frozenset({"devstorage.read_only", "devstorage.read_write", "devstorage.full_control"}),
}


READ_ONLY_SUFFIXES = (".readonly", ".read_only", ".read-only")


# Cloud Storage's scopes, each granting what those before it grant (Cloud Storage "OAuth 2.0 scopes").
STORAGE_LADDER = tuple(
    GOOGLE_AUTH + s for s in ("devstorage.read_only", "devstorage.read_write", "devstorage.full_control")
)


MAX_SCOPES = 32  # distinct scopes in one request


MAX_SCOPE_LENGTH = 512  # characters


def scope_name(scope: str) -> str | None:
    """The name of a well-formed scope under GOOGLE_AUTH (`devstorage.read_only`), or None: outside
    GOOGLE_AUTH, not of SCOPE_NAME's form, or a made-up name in a closed family (CLOSED_FAMILIES)."""
    if not scope.startswith(GOOGLE_AUTH):
        return None
    name = scope.removeprefix(GOOGLE_AUTH)
    if SCOPE_NAME.fullmatch(name) is None:
        return None
    family = name.split(".")[0]
    for closed, names in CLOSED_FAMILIES.items():
        if family.startswith(closed) and name not in names:
            return None
    return name


def covering_scope(granted: Sequence[str], scope: str) -> str | None:
    """The scope among `granted` (what the served token carries) that covers `scope`, or None:
    - the scope itself;
    - and for a well-formed scope name under GOOGLE_AUTH (`scope_name`; anything else is covered by
      itself only):
      - `X` covers `X.readonly`, `X.read_only` and `X.read-only` (a read-only scope grants a subset);
      - a Cloud Storage scope covers the weaker ones (STORAGE_LADDER);
      - `cloud-platform` covers every name whose family (up to its first ".") is not in
        NOT_CLOUD_FAMILIES: it is the scope of all Google Cloud APIs (Compute Engine "Service accounts":
        with cloud-platform, IAM alone decides), not of Workspace, consumer or sign-in scopes.
    """
    if scope in granted:
        return scope
    name = scope_name(scope)
    if name is None:
        return None
    for suffix in READ_ONLY_SUFFIXES:
        if scope.endswith(suffix) and (base := scope.removesuffix(suffix)) in granted:
            return base
    if scope in STORAGE_LADDER:
        for stronger in STORAGE_LADDER[STORAGE_LADDER.index(scope) :]:
            if stronger in granted:
                return stronger
    if CLOUD_PLATFORM in granted and name.split(".")[0] not in NOT_CLOUD_FAMILIES:
        return CLOUD_PLATFORM
    return None


def uncovered_scopes(granted: Sequence[str], asked: Sequence[str]) -> list[str]:
    """The scopes of `asked` that nothing in `granted` covers (`covering_scope`), in order; the sign-in
    scopes (SIGN_IN_SCOPES) are never among them: a token without them is what the real metadata server
    hands out for them too."""
    return [scope for scope in asked if scope not in SIGN_IN_SCOPES and covering_scope(granted, scope) is None]


def parse_scopes(values: Sequence[str]) -> tuple[str, ...]:
    """The scopes of `?scopes=a,b` (the parameter any number of times; items split at commas and
    whitespace), each once, in order. InvalidValue ("scopes") saying why: too many, too long, not printable
    ASCII."""
    scopes = list(dict.fromkeys(s for value in values for s in re.split(r"[,\s]+", value) if s))
    if len(scopes) > MAX_SCOPES:
        raise InvalidValue("scopes", f"{len(scopes)} scopes asked for; at most {MAX_SCOPES} are accepted")
    for scope in scopes:
        if len(scope) > MAX_SCOPE_LENGTH:
            raise InvalidValue("scopes", f"a scope of {len(scope)} characters; at most {MAX_SCOPE_LENGTH} are accepted")
        if not all(0x21 <= ord(c) <= 0x7E for c in scope):
            raise InvalidValue("scopes", "a scope contains characters outside printable ASCII")
    return tuple(scopes)
