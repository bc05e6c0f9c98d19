"""README "### Envoy (SDS on the Workload API socket)" is true: its Envoy YAML is valid Envoy v3 configuration,
and its resource-name table says what wlidd answers.

The YAML: three blocks, one static bootstrap once put together as their indentation says (the SDS cluster
with `node` and `static_resources`; the server-side `listeners:` under `static_resources`; the client-side
cluster appended to its `clusters:`). Each is parsed with PyYAML and loaded with protobuf's json_format into
the Envoy message it stands for (envoy.config.bootstrap.v3.Bootstrap, .cluster.v3.Cluster,
.listener.v3.Listener, from xds-protos) with ignore_unknown_fields=False: a misspelt field or an enum value
Envoy does not have fails, as Envoy's own loader refuses it. `typed_config` and the other `Any` fields are
resolved by their `@type` through the default descriptor pool, which knows the message modules imported here.
Then what Envoy checks after parsing, here too:
  - the protoc-gen-validate rules on every field set and every required one (Envoy runs `MessageUtil::validate`
    on each config message: source/common/protobuf/utility.h), the subset of rule kinds these messages use
    (`validate_pgv`); and no deprecated field (Envoy warns, or refuses those disallowed by default);
  - every cluster a route or an SDS config names exists (Envoy refuses a static route_config naming an
    unknown cluster: RouteConfiguration.validate_clusters defaults to true for it), except one the README marks
    as the reader's own with `# … not shown`;
  - SDS needs the node's id and cluster (Envoy checks both for an xDS subscription: Config::Utility::
    checkLocalInfo), an HTTP/2 cluster for gRPC, and the socket wlidd listens on by default; and each secret
    name is one wlidd answers with a secret of the kind Envoy asks for (wlidd.workload_api.sds.select).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Every message an `@type` in the README names: imported so that the descriptor pool can resolve it.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import duration_pb2, json_format, symbol_database
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from validate import validate_pb2

from wlidd.config.listeners import WorkloadApiListenerConfig
from wlidd.emulator.ca import CertificateAuthority, cert_pem
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.watch import IdentityState
from wlidd.workload_api.sds import Credentials, build_secret, credentials_of, select
from wlidd.workload_api.sds_settings import SdsSettings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "### Envoy (SDS on the Workload API socket)"
SDS_CLUSTER = "wlidd_sds"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n### ", start + len(SECTION))
    return text[start:end]


def yaml_blocks() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", section(), re.S | re.M)


def bootstrap_document() -> dict[str, Any]:
    """The three blocks as one bootstrap, the way their indentation places them."""
    sds, server, client = (yaml.safe_load(block) for block in yaml_blocks())
    document = dict(sds)
    document["static_resources"] = dict(sds["static_resources"])
    document["static_resources"]["listeners"] = server["listeners"]
    document["static_resources"]["clusters"] = sds["static_resources"]["clusters"] + client
    return document


def load(document: Any, message: type[Message]) -> Any:
    """`document` (YAML values) as the Envoy message, unknown fields refused (json_format.ParseError)."""
    return json_format.ParseDict(json.loads(json.dumps(document)), message(), ignore_unknown_fields=False)


def unpacked(value: Any) -> Message:
    """The message inside an Any (its type must be known to the default descriptor pool)."""
    inner = symbol_database.Default().GetSymbol(value.type_url.split("/")[-1])()
    assert value.Unpack(inner), value.type_url
    return inner


def messages(message: Message, where: str) -> Iterator[tuple[str, Message]]:
    """Every message set in `message` (itself first), with its path; Any values unpacked, map values included."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Any":
        inner = unpacked(message)
        yield from messages(inner, f"{where}<{inner.DESCRIPTOR.name}>")
        return
    yield where, message
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                for key, item in value.items():
                    yield from messages(item, f"{where}.{field.name}[{key!r}]")
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from messages(item, f"{where}.{field.name}[{index}]")
        else:
            yield from messages(value, f"{where}.{field.name}")


def _rules(field: FieldDescriptor) -> Any:
    options = field.GetOptions()
    return options.Extensions[validate_pb2.rules] if options.HasExtension(validate_pb2.rules) else None


def _is_set(message: Message, field: FieldDescriptor) -> bool:
    value = getattr(message, field.name)
    if field.is_repeated:
        return len(value) > 0
    return message.HasField(field.name) if field.has_presence else bool(value != field.default_value)


def _seconds(value: duration_pb2.Duration) -> float:
    return float(value.seconds + value.nanos / 1e9)


def _scalar_problem(kind: str, rule: Any, value: Any, enum: Any = None) -> str | None:
    """What one value breaks of its PGV rule of this kind (None: nothing)."""
    has = rule.HasField
    if kind == "string":
        size = len(value.encode())
        if (has("min_len") and len(value) < rule.min_len) or (has("min_bytes") and size < rule.min_bytes):
            return f"{value!r} is too short"
        if (has("max_len") and len(value) > rule.max_len) or (has("max_bytes") and size > rule.max_bytes):
            return f"{value!r} is too long"
    elif kind == "enum":
        if rule.defined_only and enum is not None and value not in enum.values_by_number:
            return f"enum value {value} is not defined"
        allowed = getattr(rule, "in")  # `in`, a Python keyword
        if value in rule.not_in or (allowed and value not in allowed):
            return f"enum value {value} is not allowed"
    elif kind in ("uint32", "uint64", "int32", "int64", "double", "float"):
        for bound, ok in (("lt", value < rule.lt), ("lte", value <= rule.lte), ("gt", value > rule.gt)):
            if has(bound) and not ok:
                return f"{value} breaks {bound}"
        if has("gte") and value < rule.gte:
            return f"{value} breaks gte"
    elif kind == "duration":
        seconds = _seconds(value)
        if (has("gt") and not seconds > _seconds(rule.gt)) or (has("gte") and not seconds >= _seconds(rule.gte)):
            return f"{seconds} s is too short"
        if (has("lt") and not seconds < _seconds(rule.lt)) or (has("lte") and not seconds <= _seconds(rule.lte)):
            return f"{seconds} s is too long"
    return None


def _field_problems(message: Message, field: FieldDescriptor) -> list[str]:
    """What one field breaks of its PGV rules and Envoy's deprecations."""
    rules, is_set = _rules(field), _is_set(message, field)
    problems = ["deprecated"] if is_set and field.GetOptions().deprecated else []
    kind = rules.WhichOneof("type") if rules is not None else None
    if kind is None or (field.containing_oneof is not None and not is_set):  # PGV skips a oneof's other arms
        return problems
    if kind in ("message", "duration") and getattr(rules, kind).required and not is_set:
        return [*problems, "required"]
    values = getattr(message, field.name)
    if kind == "repeated":
        repeated = rules.repeated
        if repeated.HasField("min_items") and len(values) < repeated.min_items:
            problems.append(f"at least {repeated.min_items} items")
        if repeated.HasField("max_items") and len(values) > repeated.max_items:
            problems.append(f"at most {repeated.max_items} items")
        kind = repeated.items.WhichOneof("type") if repeated.HasField("items") else None
        rule, values = (getattr(repeated.items, kind) if kind else None), list(values)
    else:
        # an unset scalar is checked too (PGV does: an empty required name fails min_len), a message (a
        # Duration, a wrapper such as UInt32Value whose rule is its `value`'s) only when set
        message_typed = field.type == FieldDescriptor.TYPE_MESSAGE
        if message_typed and kind != "duration":
            values = values.value
        rule, values = getattr(rules, kind), [values] if is_set or not message_typed else []
    for value in values if kind not in (None, "message") else []:
        problem = _scalar_problem(str(kind), rule, value, field.enum_type)
        if problem is not None:
            problems.append(problem)
    return problems


def validate_pgv(message: Message, where: str) -> list[str]:
    """The protoc-gen-validate rules `message` breaks (not its sub-messages: see `messages`), for the rule kinds
    used by the messages of the README: required messages and oneofs, string lengths, enum membership, number
    bounds, durations, repeated counts; and the deprecated fields it sets."""
    descriptor: Descriptor = message.DESCRIPTOR
    problems = [f"{where}.{f.name}: {p}" for f in descriptor.fields for p in _field_problems(message, f)]
    for oneof in descriptor.oneofs:
        options = oneof.GetOptions()
        required = options.HasExtension(validate_pb2.required) and options.Extensions[validate_pb2.required]
        if required and message.WhichOneof(oneof.name) is None:
            problems.append(f"{where}: one of {oneof.name} is required")
    return problems


def envoy_problems(message: Message, where: str) -> list[str]:
    return [problem for path, inner in messages(message, where) for problem in validate_pgv(inner, path)]


@pytest.fixture(scope="module")
def bootstrap() -> Any:
    return load(bootstrap_document(), bootstrap_pb2.Bootstrap)


# ---- the YAML, as Envoy reads it ------------------------------------------------------------------------------


def test_the_section_has_the_sds_cluster_the_server_listener_and_the_client_cluster() -> None:
    sds, server, client = (yaml.safe_load(block) for block in yaml_blocks())
    assert set(sds) == {"node", "static_resources"} and list(server) == ["listeners"] and isinstance(client, list)


def test_each_block_loads_as_the_envoy_message_it_stands_for() -> None:
    sds, server, client = (yaml.safe_load(block) for block in yaml_blocks())
    load(sds, bootstrap_pb2.Bootstrap)
    for listener in server["listeners"]:
        load(listener, listener_pb2.Listener)
    for cluster in client:
        load(cluster, cluster_pb2.Cluster)


def test_the_blocks_together_are_one_bootstrap_that_breaks_no_validation_rule_and_uses_no_deprecated_field(
    bootstrap: Any,
) -> None:
    assert [c.name for c in bootstrap.static_resources.clusters] == [SDS_CLUSTER, "partner_api"]
    assert [listener.name for listener in bootstrap.static_resources.listeners] == ["inbound_mtls"]
    assert envoy_problems(bootstrap, "bootstrap") == []


def test_a_misspelt_field_a_broken_rule_or_a_deprecated_field_is_caught() -> None:
    """The checks above can fail: a misspelt key, an unknown enum value, a zero timeout, an empty required
    name, the deprecated v2-style `http2_protocol_options` on the cluster."""
    document = bootstrap_document()
    cluster = document["static_resources"]["clusters"][0]
    with pytest.raises(json_format.ParseError, match="conect_timeout"):
        load({**cluster, "conect_timeout": cluster["connect_timeout"]}, cluster_pb2.Cluster)
    with pytest.raises(json_format.ParseError, match="STATICK"):
        load({**cluster, "type": "STATICK"}, cluster_pb2.Cluster)
    broken = load({**cluster, "connect_timeout": "0s", "load_assignment": {"cluster_name": ""}}, cluster_pb2.Cluster)
    assert envoy_problems(broken, "c") == [
        "c.connect_timeout: 0.0 s is too short",
        "c.load_assignment.cluster_name: '' is too short",
    ]
    old_style = load({**cluster, "http2_protocol_options": {}}, cluster_pb2.Cluster)
    assert envoy_problems(old_style, "c") == ["c.http2_protocol_options: deprecated"]


def sds_configs(bootstrap: Any) -> list[tuple[str, str, Any]]:
    """(kind, secret name, its SdsSecretConfig) of every SDS secret the bootstrap asks for."""
    found = []
    for _, message in messages(bootstrap, "bootstrap"):
        if message.DESCRIPTOR.full_name == "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext":
            found += [("tls_certificate", c.name, c) for c in message.tls_certificate_sds_secret_configs]
            combined = message.combined_validation_context.validation_context_sds_secret_config
            if message.combined_validation_context.HasField("validation_context_sds_secret_config"):
                found.append(("validation_context", combined.name, combined))
            if message.HasField("validation_context_sds_secret_config"):
                config = message.validation_context_sds_secret_config
                found.append(("validation_context", config.name, config))
    return found


def test_every_sds_secret_is_fetched_over_grpc_from_the_wlidd_cluster(bootstrap: Any) -> None:
    configs = sds_configs(bootstrap)
    assert len(configs) == 4  # a certificate and a validation context, server side and client side
    for _, _, config in configs:
        source = config.sds_config
        assert source.resource_api_version == source.api_config_source.transport_api_version == 2  # V3
        assert source.api_config_source.api_type == source.api_config_source.GRPC
        assert [s.envoy_grpc.cluster_name for s in source.api_config_source.grpc_services] == [SDS_CLUSTER]


def test_the_sds_cluster_speaks_http2_to_wlidds_default_socket_and_the_node_is_named(bootstrap: Any) -> None:
    assert bootstrap.node.id and bootstrap.node.cluster
    [cluster] = [c for c in bootstrap.static_resources.clusters if c.name == SDS_CLUSTER]
    assert cluster.type == cluster.STATIC  # Envoy fetches secrets before any dynamic cluster exists
    options = unpacked(cluster.typed_extension_protocol_options[HTTP_OPTIONS])
    assert options.explicit_http_config.HasField("http2_protocol_options")
    [[endpoint]] = [[e.endpoint for e in group.lb_endpoints] for group in cluster.load_assignment.endpoints]
    assert endpoint.address.pipe.path == str(WorkloadApiListenerConfig().path)


def test_every_cluster_a_route_names_exists_or_is_marked_as_the_readers_own(bootstrap: Any) -> None:
    defined = {c.name for c in bootstrap.static_resources.clusters}
    routed = {
        m.cluster for _, m in messages(bootstrap, "b") if m.DESCRIPTOR.full_name == "envoy.config.route.v3.RouteAction"
    }
    for name in routed - defined:
        [line] = [line for line in section().splitlines() if re.search(rf"\bcluster: {name}\b", line)]
        assert "not shown" in line, f"route to {name!r}, a cluster the examples do not define and do not say is yours"


# ---- the resource names: the README's examples and table against what wlidd answers ------------------------------


def caller(ca: CertificateAuthority, partner: CertificateAuthority) -> Credentials:
    """A caller holding spiffe://example.org/ns/prod/sa/web (first) and .../sa/api, with partner.org federated."""
    states = []
    for number, path in enumerate(("/ns/prod/sa/web", "/ns/prod/sa/api"), start=1):
        issued = ca.issue_svid(path)
        files = CredentialFiles(
            f"test:{path}",
            issued.chain_pem,
            issued.key_pem,
            own_bundle=ca.bundle_pem,
            extra_bundles=((partner.trust_domain, cert_pem(partner.root)),),
        )
        now = dt.datetime.now(dt.UTC)
        identity = build_identity(files, now)
        states.append(IdentityState(path.rsplit("/", 1)[1], identity, None, number, now))  # type: ignore[arg-type]
    creds = credentials_of(states)
    assert creds is not None
    return creds


@pytest.fixture(scope="module")
def partner() -> CertificateAuthority:
    return CertificateAuthority("partner.org")


def resolved(names: list[str], creds: Credentials, spiffe: bool = True) -> list[tuple[str, str, Any]]:
    """(name, kind, the Secret) of what wlidd answers these names with."""
    out = []
    for resource in select(SdsSettings(), names, spiffe, creds).resources:
        secret = build_secret(resource)
        out.append((resource.name, secret.WhichOneof("type"), secret))
    return out


def test_the_secret_names_of_the_yaml_are_served_as_the_kind_they_are_asked_for(
    bootstrap: Any, ca: CertificateAuthority, partner: CertificateAuthority
) -> None:
    creds = caller(ca, partner)
    for kind, name, _ in sds_configs(bootstrap):
        [(served, served_kind, _)] = resolved([name], creds)
        assert (served, served_kind) == (name, kind)


def table() -> dict[str, str]:
    """The resource-name table: {first cell: second cell}."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", section(), re.M)
    return {name: what for name, what in rows if name not in ("resource name", "---")}


def validator_domains(secret: Any) -> list[str]:
    from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2

    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert secret.validation_context.custom_validator_config.typed_config.Unpack(config)
    return [td.name for td in config.trust_domains]


def test_the_resource_name_table_says_what_wlidd_answers(
    ca: CertificateAuthority, partner: CertificateAuthority
) -> None:
    rows = table()
    assert list(rows) == [
        "`default`",
        "a SPIFFE ID, e.g. `spiffe://example.org/ns/prod/sa/web`",
        "`ROOTCA`",
        "`spiffe://<trust domain>`, e.g. `spiffe://partner.org`",
        "`ALL`",
        "none (empty list)",
        "anything else",
    ]
    creds = caller(ca, partner)
    web, api = (held.svid for held in creds.identities)
    # default: the first identity, chain and PKCS#8 key
    [(_, kind, secret)] = resolved(["default"], creds)
    assert kind == "tls_certificate" and "first identity" in rows["`default`"] and "PKCS#8" in rows["`default`"]
    assert secret.tls_certificate.certificate_chain.inline_bytes == web.chain_pem
    assert secret.tls_certificate.private_key.inline_bytes.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    # a SPIFFE ID: that identity's certificate (the second one here, to tell it from `default`)
    [(_, kind, secret)] = resolved([str(api.spiffe_id)], creds)
    assert kind == "tls_certificate" and secret.tls_certificate.certificate_chain.inline_bytes == api.chain_pem
    [(_, kind, _)] = resolved(["spiffe://example.org/ns/prod/sa/web"], creds)
    assert kind == "tls_certificate"
    # ROOTCA: the first identity's trust domain, SPIFFE validator (or trusted_ca: the paragraph under the table)
    [(_, kind, secret)] = resolved(["ROOTCA"], creds)
    assert kind == "validation_context" and validator_domains(secret) == ["example.org"]
    [(_, _, secret)] = resolved(["ROOTCA"], creds, spiffe=False)
    assert secret.validation_context.trusted_ca.inline_bytes == ca.bundle_pem
    # spiffe://<trust domain>: that domain's bundle, a federated one included
    [(_, kind, secret)] = resolved(["spiffe://partner.org"], creds)
    assert kind == "validation_context" and validator_domains(secret) == ["partner.org"]
    # ALL: every trust domain, one entry each; left out without the SPIFFE validator ("ALL needs" it)
    [(_, kind, secret)] = resolved(["ALL"], creds)
    assert kind == "validation_context" and validator_domains(secret) == ["example.org", "partner.org"]
    assert resolved(["ALL"], creds, spiffe=False) == [] and "`ALL` needs the SPIFFE validator" in section()
    # none: every bundle by trust domain ID and every identity by SPIFFE ID
    assert [(name, kind) for name, kind, _ in resolved([], creds)] == [
        ("spiffe://example.org", "validation_context"),
        ("spiffe://partner.org", "validation_context"),
        (str(web.spiffe_id), "tls_certificate"),
        (str(api.spiffe_id), "tls_certificate"),
    ]
    # anything else: left out (the stream goes on: tests/test_sds.py)
    assert resolved(["spiffe://example.org/ns/prod/sa/nobody", "spiffe://nowhere.org", "Default"], creds) == []
    assert "left out" in rows["anything else"]
