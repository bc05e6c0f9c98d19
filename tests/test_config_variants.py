"""Identities and tokens as tagged unions: one model per `source` and per `flow`, each with exactly its keys;
a key of another variant is refused naming the key and both variants; the consumers' strategy (a source's
plan, a flow's steps) is chosen by the config's type, and none asserts a config field is set."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from wlidd.config import (
    CertificateConfigIdentityConfig,
    Config,
    EntraStsTokenConfig,
    FilesIdentityConfig,
    GceIdentityConfig,
    GceMetadataTokenConfig,
    X509StsTokenConfig,
    load_config,
)
from wlidd.config_toml import config_toml
from wlidd.errors import ConfigError
from wlidd.svid.load.plans import CertificateConfigPlan, FilesPlan, GcePlan
from wlidd.svid.load.source import CredentialSource
from wlidd.tokens.flows import Flow
from wlidd.tokens.flows.entra_sts import EntraStsSteps
from wlidd.tokens.flows.gce_metadata import GceMetadataSteps
from wlidd.tokens.flows.x509_sts import X509StsSteps

WLIDD = Path(__file__).resolve().parent.parent / "wlidd"

IDENTITIES = """
[identities.vm]
source = "gce"

[identities.gcloud]
source = "certificate_config"
certificate_config = "/etc/wlidd/certificate_config.json"
bundle = "/etc/wlidd/ca.pem"

[identities.web]
source = "files"
cert = "/etc/certs/chain.pem"
key = "/etc/certs/key.pem"
bundle = "/etc/certs/ca.pem"
"""

STS = 'sts.audience = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x"\n'
ENTRA = 'entra.tenant_id = "t"\nentra.client_id = "c"\nentra.scope = "api://app/.default"\n'

FILES_WEB = '[identities.web]\nsource = "files"\ncert = "/c.pem"\nkey = "/k.pem"\nbundle = "/b.pem"\n'

TOKENS = f"""
[tokens.entra]
flow = "entra-sts"
identity = "web"
{ENTRA}{STS}
[tokens.x509]
flow = "x509-sts"
identity = "web"
{STS}impersonate.service_account = "sa@p.iam.gserviceaccount.com"

[tokens.mds]
flow = "gce-metadata"
metadata.url = "http://127.0.0.1:8080"
"""


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "wlidd.toml"
    path.write_text(text)
    return load_config(path, environ or {})


def refusal(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    return info.value.message


def test_every_source_and_flow_loads_as_its_own_model(tmp_path: Path) -> None:
    config = load_text(tmp_path, IDENTITIES + TOKENS)
    identities, tokens = config.identities, config.tokens
    assert isinstance(identities["vm"], GceIdentityConfig) and identities["vm"].gce_dir().name
    assert isinstance(identities["gcloud"], CertificateConfigIdentityConfig)
    assert isinstance(identities["web"], FilesIdentityConfig) and identities["web"].cert.name == "chain.pem"
    assert isinstance(tokens["entra"], EntraStsTokenConfig) and tokens["entra"].entra.client_id == "c"
    assert isinstance(tokens["x509"], X509StsTokenConfig) and tokens["x509"].identity == "web"
    assert isinstance(tokens["mds"], GceMetadataTokenConfig) and tokens["mds"].metadata_config().account == "default"


def test_the_upstream_defaults_follow_the_flow(tmp_path: Path) -> None:
    """x509-sts talks to the mTLS endpoints by default (SPECS.md §7), entra-sts to the plain ones; a token
    without impersonation serves the STS scopes, gce-metadata the cloud-platform scope by default."""
    tokens = load_text(tmp_path, IDENTITIES + TOKENS).tokens
    assert tokens["x509"].sts_url() == "https://sts.mtls.googleapis.com/v1/token"
    assert tokens["x509"].impersonate_base() == "https://iamcredentials.mtls.googleapis.com"
    assert tokens["entra"].sts_url() == "https://sts.googleapis.com/v1/token"
    assert tokens["entra"].impersonate_base() == "https://iamcredentials.googleapis.com"
    assert tokens["entra"].scopes() == ("https://www.googleapis.com/auth/cloud-platform",)
    assert tokens["mds"].scopes() == ("https://www.googleapis.com/auth/cloud-platform",)
    assert tokens["mds"].identity is None and tokens["mds"].impersonate is None


def test_every_source_and_flow_prints_and_loads_back_equal(tmp_path: Path) -> None:
    """`wlidd check --print` of each variant (its tag first) loads back to the same models."""
    config = load_text(tmp_path, IDENTITIES + TOKENS)
    text = config_toml(config)
    again = load_text(tmp_path, text)
    assert again == config
    assert text.index('source = "gce"') < text.index("reload_interval")


@pytest.mark.parametrize(
    ("table", "line"),
    [
        (
            '[identities.a]\nsource = "files"\ncert = "/c"\nkey = "/k"\nbundle = "/b"\ndir = "/d"\n',
            "identities.a.dir: only for source 'gce', not for source 'files'",
        ),
        (
            '[identities.a]\nsource = "gce"\ncert = "/c"\n',
            "identities.a.cert: only for source 'files', not for source 'gce'",
        ),
        (
            '[identities.a]\nsource = "certificate_config"\nbundle = "/b"\nkey = "/k"\n',
            "identities.a.key: only for source 'gce' or 'files', not for source 'certificate_config'",
        ),
        (
            '[identities.a]\nsource = "gce"\ncertificate_config = "/c.json"\n',
            "identities.a.certificate_config: only for source 'certificate_config', not for source 'gce'",
        ),
        (
            f'[tokens.t]\nflow = "x509-sts"\nidentity = "web"\n{STS}entra.client_id = "c"\n',
            "tokens.t.entra: only for flow 'entra-sts', not for flow 'x509-sts'",
        ),
        (
            f'[tokens.t]\nflow = "entra-sts"\nidentity = "web"\n{ENTRA}{STS}metadata.account = "x"\n',
            "tokens.t.metadata: only for flow 'gce-metadata', not for flow 'entra-sts'",
        ),
        ('[tokens.t]\nflow = "gce-metadata"\n' + STS, "tokens.t.sts: only for flow 'entra-sts' or 'x509-sts', not for"),
        (
            '[tokens.t]\nflow = "gce-metadata"\nidentity = "web"\n',
            "tokens.t.identity: only for flow 'entra-sts' or 'x509-sts', not for flow 'gce-metadata'",
        ),
    ],
    ids=[
        "dir-on-files",
        "cert-on-gce",
        "key-on-cc",
        "cc-on-gce",
        "entra-on-x509",
        "metadata-on-entra",
        "sts-on-mds",
        "identity-on-mds",
    ],
)
def test_a_key_of_another_variant_is_refused_naming_the_key_and_both_variants(
    tmp_path: Path, table: str, line: str
) -> None:
    assert f"{tmp_path / 'wlidd.toml'}: {line}" in refusal(tmp_path, FILES_WEB + table)


def test_a_key_of_another_source_set_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    message = refusal(tmp_path, FILES_WEB, {"WLIDD_IDENTITIES__WEB__DIR": "/d"})
    assert "environment WLIDD_IDENTITIES__WEB__DIR: identities.web.dir: only for source 'gce'" in message


def test_the_keys_a_flow_needs_are_named_together_with_the_table_keys_they_need(tmp_path: Path) -> None:
    path = tmp_path / "wlidd.toml"
    message = refusal(tmp_path, '[tokens.t]\nflow = "entra-sts"\n')
    assert (
        f"{path}: tokens.t: flow 'entra-sts' needs sts (sts.audience), entra (entra.tenant_id, entra.client_id,"
        " entra.scope)" in message
    )
    message = refusal(tmp_path, FILES_WEB + '[tokens.t]\nflow = "x509-sts"\n' + STS)
    assert f"{path}: tokens.t: flow 'x509-sts' needs identity (its SVID is the client certificate)" in message


def test_a_missing_or_unknown_source_or_flow_names_the_choices(tmp_path: Path) -> None:
    assert "identities.a.source: Field required: 'gce', 'certificate_config' or 'files'" in refusal(
        tmp_path, '[identities.a]\ndir = "/d"\n'
    )
    assert "tokens.t.flow: 'entra' is not a flow: use 'entra-sts', 'x509-sts' or 'gce-metadata'" in refusal(
        tmp_path, '[tokens.t]\nflow = "entra"\n'
    )


def test_each_source_gets_its_own_plan_and_names_its_path(tmp_path: Path) -> None:
    identities = load_text(tmp_path, IDENTITIES).identities
    environ = {"GOOGLE_API_CERTIFICATE_CONFIG": "/elsewhere.json"}
    sources = {name: CredentialSource(name, config, environ) for name, config in identities.items()}
    assert [type(source.plan) for source in sources.values()] == [GcePlan, CertificateConfigPlan, FilesPlan]
    assert sources["vm"].describe() == "/var/run/secrets/workload-spiffe-credentials"
    assert sources["gcloud"].describe() == "/etc/wlidd/certificate_config.json"  # configured wins over the env
    assert sources["web"].describe() == "/etc/certs/chain.pem"
    assert list(sources["web"].plan.roles()) == ["chain", "key", "bundle"]


def test_each_flow_gets_its_own_steps(tmp_path: Path) -> None:
    tokens = load_text(tmp_path, IDENTITIES + TOKENS).tokens
    flows = {name: Flow(name, config) for name, config in tokens.items()}
    assert [type(flow.steps) for flow in flows.values()] == [EntraStsSteps, X509StsSteps, GceMetadataSteps]
    assert [flow.mints_id_tokens for flow in flows.values()] == [False, True, True]


def _reads_config(node: ast.expr, bound: set[str]) -> bool:
    """Whether `node` is a config value read as such: `config`/`cfg` or a name bound from one, an attribute,
    item or method call on it (`self.config.entra`, `cfg.gce_dir()`), or a tuple, `or`, `x if c else y` of
    those. A call that merely takes a config value (`build(files, trust_domain)`) is something else."""
    match node:
        case ast.Name(id=name):
            return name in ("config", "cfg") or name in bound
        case ast.Attribute(attr="config"):
            return True
        case ast.Attribute(value=inner) | ast.Subscript(value=inner) | ast.Call(func=inner):
            return _reads_config(inner, bound)
        case ast.Tuple(elts=parts) | ast.BoolOp(values=parts):
            return any(_reads_config(part, bound) for part in parts)
        case ast.IfExp(body=body, orelse=orelse):
            return _reads_config(body, bound) or _reads_config(orelse, bound)
    return False


def _config_asserts(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """`assert` statements that test a config value (`_reads_config`), directly or through a local name bound
    from one in the same function (`entra = self.config.entra`, `entra, sts = ...`)."""
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        assignments = [n for n in ast.walk(function) if isinstance(n, ast.Assign | ast.AnnAssign) and n.value]
        bound: set[str] = set()
        while True:  # until no assignment binds another name (one may read a name bound further down)
            before = len(bound)
            for node in assignments:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if node.value is not None and _reads_config(node.value, bound):
                    bound |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            if len(bound) == before:
                break
        for node in ast.walk(function):
            if isinstance(node, ast.Assert):
                tested = [n for n in ast.walk(node.test) if isinstance(n, ast.expr)]
                if any(_reads_config(n, bound) for n in tested):
                    yield node.lineno, ast.unparse(node.test)


def test_the_assert_finder_sees_an_assert_on_a_config_field_through_a_local_name() -> None:
    sample = "def f(self):\n    entra, sts = self.config.entra, self.config.sts\n    assert entra is not None\n"
    assert list(_config_asserts(ast.parse(sample))) == [(3, "entra is not None")]
    built = "def f(self):\n    td = self.config.trust_domain\n    state = build(td)\n    assert state is not None\n"
    assert list(_config_asserts(ast.parse(built))) == []  # a value made from a config value is not one


def test_no_consumer_asserts_that_a_config_field_is_set() -> None:
    """The variant's type says which keys it has: a consumer never checks a config field with `assert`
    (which `python -O` drops), so a wrong config cannot reach it as an AssertionError or an AttributeError."""
    found = [
        f"{path.relative_to(WLIDD.parent)}:{line}: assert {test}"
        for path in sorted(WLIDD.rglob("*.py"))
        if "_pb2" not in path.name
        for line, test in _config_asserts(ast.parse(path.read_text(), str(path)))
    ]
    assert found == []
