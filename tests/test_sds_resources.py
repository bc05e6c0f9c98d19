"""The pure SDS core: which secret answers which name (SPIRE's handler_test.go cases, spiffe/spire
pkg/agent/endpoints/sdsv3 at ef8527e, where wlidd behaves the same), the Secret messages, and the xDS
protocol state of a stream (ACK, NACK, stale nonce, names changed, unsubscribing; delta subscriptions; what
a state holds of its client's strings) without a socket.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.type.v3 import semantic_version_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from wlidd.emulator.ca import CertificateAuthority, IssuedSvid, cert_pem
from wlidd.errors import InvalidValue, SdsRequestError
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.watch import IdentityState
from wlidd.workload_api.sds import (
    SECRET_TYPE_URL,
    NodeFacts,
    SecretCache,
    credentials_of,
    go_parse_bool,
    node_facts,
    select,
    spiffe_validation,
)
from wlidd.workload_api.sds_delta import MAX_REMOVED_BYTES, DeltaStream
from wlidd.workload_api.sds_protocol import (
    MAX_STATE_BYTES,
    SENT_HISTORY,
    SentResponses,
    SotwStream,
    fetch_answer,
    held_bytes,
)
from wlidd.workload_api.sds_settings import SdsSettings

APP = "spiffe://example.org/ns/default/sa/app"
DEFAULTS = SdsSettings()


def state(name: str, issued: IssuedSvid, ca: CertificateAuthority, *federated: CertificateAuthority) -> IdentityState:
    files = CredentialFiles(
        f"test:{name}",
        issued.chain_pem,
        issued.key_pem,
        own_bundle=ca.bundle_pem,
        extra_bundles=tuple((f.trust_domain, cert_pem(f.root)) for f in federated),
    )
    identity = build_identity(files, dt.datetime.now(dt.UTC))
    return IdentityState(name, identity, None, 1, dt.datetime.now(dt.UTC))  # type: ignore[arg-type]


@pytest.fixture
def creds(ca: CertificateAuthority, foreign_ca: CertificateAuthority) -> Any:
    """Two identities (app, then worker) of example.org, with other.org federated."""
    return credentials_of(
        [
            state("default", ca.issue_svid(), ca, foreign_ca),
            state("worker", ca.issue_svid("/ns/default/sa/worker"), ca, foreign_ca),
        ]
    )


def names_of(selection: Any) -> list[tuple[str, str]]:
    return [(r.name, r.content[0]) for r in selection.resources]


def node(major: int = 1, minor: int = 30, **metadata: Any) -> Any:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    version = semantic_version_pb2.SemanticVersion(major_number=major, minor_number=minor)
    return base_pb2.Node(
        id="envoy", cluster="c", metadata=meta, user_agent_build_version=base_pb2.BuildVersion(version=version)
    )


def secret(packed: Any) -> Any:
    out = secret_pb2.Secret()
    assert packed.Unpack(out)
    return out


class TestSelect:
    def test_no_name_asks_for_every_bundle_by_domain_and_every_identity_by_spiffe_id(self, creds: Any) -> None:
        assert names_of(select(DEFAULTS, [], True, creds)) == [
            ("spiffe://example.org", "validation_context"),
            ("spiffe://other.org", "validation_context"),
            (APP, "tls_certificate"),
            ("spiffe://example.org/ns/default/sa/worker", "tls_certificate"),
        ]

    def test_default_is_the_first_identity_and_a_spiffe_id_names_its_own(self, creds: Any) -> None:
        chosen = select(DEFAULTS, ["default", "spiffe://example.org/ns/default/sa/worker"], True, creds)
        assert [r.identity for r in chosen.resources] == ["default", "worker"]
        assert chosen.identities == ("default", "worker")

    def test_default_and_the_first_identitys_id_are_both_served(self, creds: Any) -> None:
        """SPIRE's switch serves the first identity under one of the two names only (handler.go 366-381)."""
        chosen = select(DEFAULTS, [APP, "default"], True, creds)
        assert names_of(chosen) == [(APP, "tls_certificate"), ("default", "tls_certificate")] and not chosen.missing

    def test_rootca_and_the_domain_ids_are_validation_contexts_of_one_domain(self, creds: Any) -> None:
        chosen = select(DEFAULTS, ["ROOTCA", "spiffe://example.org", "spiffe://other.org"], True, creds)
        assert [(r.name, [str(b.trust_domain) for b in r.bundles]) for r in chosen.resources] == [
            ("ROOTCA", ["example.org"]),
            ("spiffe://example.org", ["example.org"]),
            ("spiffe://other.org", ["other.org"]),
        ]

    def test_all_holds_every_domain_sorted(self, creds: Any) -> None:
        [resource] = select(DEFAULTS, ["ALL"], True, creds).resources
        assert [str(b.trust_domain) for b in resource.bundles] == ["example.org", "other.org"]

    def test_all_without_the_spiffe_validator_is_left_out_with_its_reason(self, creds: Any) -> None:
        chosen = select(DEFAULTS, ["ALL", "default"], False, creds)
        assert names_of(chosen) == [("default", "tls_certificate")]
        assert [name for name, _ in chosen.missing] == ["ALL"] and "SPIFFE validator" in chosen.missing[0][1]

    def test_unknown_names_are_left_out(self, creds: Any) -> None:
        chosen = select(DEFAULTS, ["spiffe://example.org/WHATEVER", "spiffe://nowhere.org", "", "default"], True, creds)
        assert names_of(chosen) == [("default", "tls_certificate")]
        assert [name for name, _ in chosen.missing] == ["spiffe://example.org/WHATEVER", "spiffe://nowhere.org"]

    def test_the_default_bundle_name_wins_over_all_when_they_are_the_same(self, creds: Any) -> None:
        """SPIRE: "Disable custom validation and set default bundle name to ALL" (handler_test.go 443-455)."""
        settings = SdsSettings(default_bundle_name="ALL", disable_spiffe_cert_validation=True)
        [resource] = select(settings, ["ALL"], False, creds).resources
        assert resource.name == "ALL" and [str(b.trust_domain) for b in resource.bundles] == ["example.org"]

    def test_configured_names_replace_the_defaults(self, creds: Any) -> None:
        settings = SdsSettings(default_svid_name="mine", default_bundle_name="roots", default_all_bundles_name="every")
        chosen = select(settings, ["mine", "roots", "every", "default", "ROOTCA", "ALL"], True, creds)
        assert [r.name for r in chosen.resources] == ["mine", "roots", "every"]
        assert [name for name, _ in chosen.missing] == ["default", "ROOTCA", "ALL"]

    def test_versions_follow_content_only(
        self, creds: Any, ca: CertificateAuthority, foreign_ca: CertificateAuthority
    ) -> None:
        one = select(DEFAULTS, ["default"], True, creds)
        assert one.version == select(DEFAULTS, ["default"], True, creds).version
        assert one.version != select(DEFAULTS, ["default", "ROOTCA"], True, creds).version
        rotated = credentials_of([state("default", ca.issue_svid(), ca, foreign_ca)])
        assert one.version != select(DEFAULTS, ["default"], True, rotated).version
        mine = state("default", ca.issue_svid(), ca, foreign_ca)
        before = credentials_of([mine, state("worker", ca.issue_svid("/w"), ca, foreign_ca)])
        after = credentials_of([mine, state("worker", ca.issue_svid("/w"), ca, foreign_ca)])
        assert select(DEFAULTS, ["default"], True, before).version == select(DEFAULTS, ["default"], True, after).version


class TestNode:
    @pytest.mark.parametrize(
        ("settings", "metadata", "minor", "spiffe"),
        [
            (DEFAULTS, {}, 30, True),
            (DEFAULTS, {}, 17, False),  # Envoy below 1.18: trusted_ca
            (DEFAULTS, {}, 18, True),
            (SdsSettings(disable_spiffe_cert_validation=True), {}, 30, False),
            (DEFAULTS, {"disable_spiffe_cert_validation": True}, 30, False),
            (DEFAULTS, {"disable_spiffe_cert_validation": "true"}, 30, False),
            (DEFAULTS, {"disable_spiffe_cert_validation": "false"}, 30, True),
            (DEFAULTS, {"disable_spiffe_cert_validation": "yes"}, 30, True),  # not a Go bool: ignored
            (SdsSettings(disable_spiffe_cert_validation=True), {"disable_spiffe_cert_validation": "false"}, 30, True),
            (SdsSettings(disable_spiffe_cert_validation=True), {"disable_spiffe_cert_validation": False}, 30, True),
            (SdsSettings(disable_spiffe_cert_validation=True), {"disable_spiffe_cert_validation": "yes"}, 30, False),
            (SdsSettings(disable_spiffe_cert_validation=True), {"disable_spiffe_cert_validation": 1.0}, 30, False),
        ],
    )
    def test_spiffe_validation_as_spire_decides_it(
        self, settings: SdsSettings, metadata: dict[str, Any], minor: int, spiffe: bool
    ) -> None:
        assert spiffe_validation(settings, node_facts(node(1, minor, **metadata), NodeFacts())) is spiffe

    def test_a_request_without_a_node_keeps_the_last_one(self) -> None:
        facts = node_facts(node(1, 17), NodeFacts())
        assert node_facts(None, facts) is facts and node_facts(base_pb2.Node(), facts) is facts
        assert node_facts(base_pb2.Node(id="x", user_agent_version="1.17.0"), facts).spiffe_validator

    def test_go_parse_bool(self) -> None:
        assert [go_parse_bool(t) for t in ("1", "t", "TRUE", "True", "0", "F", "false", "yes", "")] == [
            True, True, True, True, False, False, False, None, None,
        ]  # fmt: skip


class TestSecrets:
    def test_a_tls_certificate_holds_the_chain_and_the_pkcs8_key_as_inline_pem(self, creds: Any) -> None:
        [resource] = select(DEFAULTS, ["default"], True, creds).resources
        built = secret(SecretCache().packed(resource))
        svid = creds.identities[0].svid
        assert built.name == "default"
        assert built.tls_certificate.certificate_chain.inline_bytes == svid.chain_pem
        assert built.tls_certificate.private_key.inline_bytes == svid.key_pem()
        assert svid.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")

    def test_a_validation_context_is_the_spiffe_validator_with_one_domain(
        self, creds: Any, ca: CertificateAuthority
    ) -> None:
        [resource] = select(DEFAULTS, ["ROOTCA"], True, creds).resources
        context = secret(SecretCache().packed(resource)).validation_context
        assert not context.HasField("trusted_ca")
        assert context.custom_validator_config.name == "envoy.tls.cert_validator.spiffe"
        config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
        assert context.custom_validator_config.typed_config.Unpack(config)
        assert [(td.name, td.trust_bundle.inline_bytes) for td in config.trust_domains] == [
            ("example.org", ca.bundle_pem)
        ]

    def test_without_the_spiffe_validator_it_is_trusted_ca(self, creds: Any, foreign_ca: CertificateAuthority) -> None:
        [resource] = select(DEFAULTS, ["spiffe://other.org"], False, creds).resources
        context = secret(SecretCache().packed(resource)).validation_context
        assert context.trusted_ca.inline_bytes == foreign_ca.bundle_pem and not context.HasField(
            "custom_validator_config"
        )

    def test_the_cache_builds_each_content_once_and_stays_bounded(self, creds: Any) -> None:
        cache = SecretCache(max_entries=2)
        [resource] = select(DEFAULTS, ["default"], True, creds).resources
        assert cache.packed(resource) is cache.packed(resource)
        for name in ("ROOTCA", "ALL", "spiffe://other.org"):
            cache.packed(select(DEFAULTS, [name], True, creds).resources[0])
        assert repr(cache) == "SecretCache(2 secrets)"

    def test_no_key_in_the_reprs(self, creds: Any) -> None:
        selection = select(DEFAULTS, ["default"], True, creds)
        answer = fetch_answer(
            DEFAULTS, discovery_pb2.DiscoveryRequest(resource_names=["default"]), creds, SecretCache()
        )
        key = creds.identities[0].svid.key_pem().decode().splitlines()[1]
        for value in (creds, selection, answer, selection.resources[0]):
            assert key not in repr(value) and "PRIVATE KEY" not in repr(value)


def sotw(names: list[str], version: str = "", nonce: str = "", error: str | None = None, **fields: Any) -> Any:
    request = discovery_pb2.DiscoveryRequest(
        type_url=SECRET_TYPE_URL, resource_names=names, version_info=version, response_nonce=nonce, **fields
    )
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    return request


def counter() -> Any:
    numbers = itertools.count(1)
    return lambda: f"n{next(numbers)}"


class TestSotwStream:
    def test_the_first_request_is_answered_and_an_ack_is_not(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        assert stream.answer(creds) is None  # nothing asked yet
        stream.receive(sotw(["default"], node=node()))
        answer = stream.answer(creds)
        assert answer is not None and answer.nonce == "n1" and answer.message.version_info == answer.version
        assert answer.message.type_url == SECRET_TYPE_URL and len(answer.message.resources) == 1
        received = stream.receive(sotw(["default"], answer.version, "n1"))
        assert received.rejected is None and not received.stale
        assert stream.answer(creds) is None

    def test_a_reconnect_with_the_current_version_is_answered_all_the_same(self, creds: Any) -> None:
        first = SotwStream(DEFAULTS, SecretCache(), counter())
        first.receive(sotw(["default"]))
        version = first.answer(creds).version  # type: ignore[union-attr]
        again = SotwStream(DEFAULTS, SecretCache(), counter())
        again.receive(sotw(["default"], version))
        assert again.answer(creds) is not None

    def test_a_nack_is_reported_and_the_version_is_not_resent_until_it_changes(
        self, creds: Any, ca: CertificateAuthority, foreign_ca: CertificateAuthority
    ) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        answer = stream.answer(creds)
        assert answer is not None
        received = stream.receive(sotw(["default"], "", "n1", error="bad key"))
        assert received.rejected == answer.version and received.error == "bad key" and received.names == ("default",)
        assert stream.answer(creds) is None  # the same content: not resent
        rotated = credentials_of([state("default", ca.issue_svid(), ca, foreign_ca)])
        assert stream.answer(rotated) is not None

    def test_an_unrelated_identity_changing_sends_nothing(
        self, ca: CertificateAuthority, foreign_ca: CertificateAuthority
    ) -> None:
        mine = state("default", ca.issue_svid(), ca, foreign_ca)
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        assert stream.answer(credentials_of([mine, state("worker", ca.issue_svid("/w"), ca, foreign_ca)])) is not None
        assert stream.answer(credentials_of([mine, state("worker", ca.issue_svid("/w"), ca, foreign_ca)])) is None

    def test_a_stale_nonce_is_ignored_whole(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        stream.answer(creds)
        received = stream.receive(sotw(["ROOTCA"], "", "FOO"))
        assert received.stale and received.expected == "n1"
        assert stream.names == ("default",) and stream.answer(creds) is None

    def test_new_names_are_answered(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        answer = stream.answer(creds)
        stream.receive(sotw(["spiffe://example.org"], answer.version, "n1"))  # type: ignore[union-attr]
        changed = stream.answer(creds)
        assert changed is not None and [r.name for r in changed.selection.resources] == ["spiffe://example.org"]

    def test_the_node_of_the_first_request_is_kept(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["ROOTCA"], node=node(disable_spiffe_cert_validation=True)))
        answer = stream.answer(creds)
        stream.receive(sotw(["ROOTCA", "ALL"], answer.version, "n1"))  # type: ignore[union-attr]
        again = stream.answer(creds)  # the names changed: answered, still without the SPIFFE validator
        assert again is not None and [(r.name, r.content[2]) for r in again.selection.resources] == [("ROOTCA", False)]
        assert [n for n, _ in stream.missing] == ["ALL"]

    def test_nothing_is_sent_when_nothing_requested_exists(self, creds: Any) -> None:
        """Envoy NACKs an SDS update without resources: wait instead (it has initial_fetch_timeout)."""
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["spiffe://example.org/not-mine"]))
        assert stream.answer(creds) is None and stream.missing[0][0] == "spiffe://example.org/not-mine"

    def test_nothing_is_sent_before_credentials(self) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        assert stream.answer(None) is None

    def test_an_empty_list_after_names_unsubscribes_until_names_come_again(
        self, creds: Any, ca: CertificateAuthority, foreign_ca: CertificateAuthority
    ) -> None:
        """xds_protocol.rst: "If the list of resource names becomes empty, that means that the client is no
        longer interested in any resources"; the legacy wildcard is a first request only."""
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        first = stream.answer(creds)
        assert first is not None
        stream.receive(sotw([], first.version, first.nonce))
        assert stream.answer(creds) is None and stream.missing == ()
        rotated = credentials_of([state("default", ca.issue_svid(), ca, foreign_ca)])
        assert stream.answer(rotated) is None  # nothing subscribed: a rotation sends nothing either
        stream.receive(sotw(["ROOTCA"], first.version, first.nonce))
        answer = stream.answer(rotated)
        assert answer is not None and [secret(r).name for r in answer.message.resources] == ["ROOTCA"]

    def test_the_legacy_wildcard_holds_while_requests_name_nothing_and_ends_with_a_name(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw([]))
        everything = stream.answer(creds)
        assert everything is not None and len(everything.message.resources) == 4
        stream.receive(sotw([], everything.version, everything.nonce))  # its ACK, naming nothing still
        assert stream.wildcard and stream.answer(creds) is None
        stream.receive(sotw(["default"], everything.version, everything.nonce))
        named = stream.answer(creds)
        assert named is not None and [secret(r).name for r in named.message.resources] == ["default"]
        stream.receive(sotw([], named.version, named.nonce))
        assert not stream.wildcard and stream.answer(creds) is None

    def test_names_that_are_all_empty_are_not_the_wildcard(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw([""]))
        assert stream.answer(creds) is None

    def test_a_nack_is_counted_once_per_nonce_and_what_follows_it_is_no_nack(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        answer = stream.answer(creds)
        assert answer is not None
        nack = stream.receive(sotw(["default"], "", "n1", error="bad key"))
        assert nack.nack and not nack.ack and nack.rejected == answer.version
        again = stream.receive(sotw(["default"], "", "n1", error="bad key"))
        assert not again.nack and again.error == "bad key"  # reported, not counted twice
        change = stream.receive(sotw(["default", "ROOTCA"], "", "n1"))  # Envoy's next request after a NACK
        assert not change.nack and not change.ack and change.error is None

    def test_an_ack_is_the_last_nonce_and_version_without_error_detail(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        answer = stream.answer(creds)
        assert answer is not None
        assert stream.receive(sotw(["default"], answer.version, "n1")).ack
        assert not stream.receive(sotw(["default"], "older", "n1")).ack

    def test_a_late_nack_of_an_earlier_response_counts_and_a_nonce_never_sent_does_not(
        self, creds: Any, ca: CertificateAuthority, foreign_ca: CertificateAuthority
    ) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        stream.receive(sotw(["default"]))
        first = stream.answer(creds)
        assert first is not None
        assert stream.answer(credentials_of([state("default", ca.issue_svid(), ca, foreign_ca)])) is not None
        late = stream.receive(sotw(["default"], "", "n1", error="bad key"))
        assert late.stale and late.nack and late.rejected == first.version and late.names == ("default",)
        invented = stream.receive(sotw(["default"], "", "not-a-nonce-of-ours", error="bad key"))
        assert invented.stale and not invented.nack and invented.rejected is None

    def test_the_state_holds_the_names_asked_for_and_no_older_ones(self, creds: Any) -> None:
        stream = SotwStream(DEFAULTS, SecretCache(), counter())
        names = ["default"] + [f"spiffe://example.org/{i}/" + "x" * 1000 for i in range(100)]
        stream.receive(sotw(names))
        assert stream.answer(creds) is not None and len(stream.missing) == 100
        assert held_bytes(names) <= stream.held_bytes < held_bytes(names) + 1024
        stream.receive(sotw(["default"], "", "n1"))
        assert stream.missing == () and stream.held_bytes < 1024  # no name of the older request kept

    def test_a_request_whose_names_are_over_the_state_limit_is_refused(self) -> None:
        names = [f"{i:04}" + "x" * 2000 for i in range(1024)]  # within the count and length limits: 2 MB
        assert held_bytes(names) > MAX_STATE_BYTES
        with pytest.raises(SdsRequestError, match=f"more than {MAX_STATE_BYTES} bytes"):
            SotwStream(DEFAULTS, SecretCache()).receive(sotw(names))

    @pytest.mark.parametrize(
        ("request_", "message"),
        [
            (
                discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"),
                "not served here",
            ),
            (discovery_pb2.DiscoveryRequest(resource_names=["x"] * 1025), "1025 resource names"),
            (discovery_pb2.DiscoveryRequest(resource_names=["x" * 5000]), "5000 characters"),
        ],
    )
    def test_a_request_wlidd_refuses_says_why(self, request_: Any, message: str) -> None:
        with pytest.raises(SdsRequestError, match=message):
            SotwStream(DEFAULTS, SecretCache()).receive(request_)


def delta(
    subscribe: list[str] = (), unsubscribe: list[str] = (), nonce: str = "", error: str | None = None, **fields: Any
) -> Any:  # type: ignore[assignment]
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=SECRET_TYPE_URL,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe,
        response_nonce=nonce,
        **fields,
    )
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    return request


class TestDeltaStream:
    def test_subscribed_names_are_sent_with_versions_and_unknown_ones_removed_once(self, creds: Any) -> None:
        stream = DeltaStream(DEFAULTS, SecretCache(), counter())
        stream.receive(delta(["default", "nope"]))
        answer = stream.answer(creds)
        assert answer is not None
        assert [(r.name, bool(r.version)) for r in answer.message.resources] == [("default", True)]
        assert list(answer.message.removed_resources) == ["nope"]
        stream.receive(delta(nonce=answer.nonce))
        assert stream.answer(creds) is None

    def test_unsubscribe_then_subscribe_sends_it_again(self, creds: Any) -> None:
        stream = DeltaStream(DEFAULTS, SecretCache(), counter())
        stream.receive(delta(["default", "ROOTCA"]))
        stream.answer(creds)
        stream.receive(delta(unsubscribe=["ROOTCA"]))
        assert stream.answer(creds) is None
        stream.receive(delta(["ROOTCA"]))
        answer = stream.answer(creds)
        assert answer is not None and [r.name for r in answer.message.resources] == ["ROOTCA"]

    def test_a_nack_names_the_resources_and_nothing_is_resent(self, creds: Any) -> None:
        stream = DeltaStream(DEFAULTS, SecretCache(), counter())
        stream.receive(delta(["default"]))
        answer = stream.answer(creds)
        received = stream.receive(delta(nonce=answer.nonce, error="rejected"))  # type: ignore[union-attr]
        assert received.names == ("default",) and received.error == "rejected" and received.nack
        assert received.rejected == answer.version  # type: ignore[union-attr]
        assert stream.answer(creds) is None

    def test_initial_versions_spare_what_the_client_has(self, creds: Any) -> None:
        first = DeltaStream(DEFAULTS, SecretCache(), counter())
        first.receive(delta(["default"]))
        version = first.answer(creds).message.resources[0].version  # type: ignore[union-attr]
        again = DeltaStream(DEFAULTS, SecretCache(), counter())
        again.receive(delta(["default", "ROOTCA"], initial_resource_versions={"default": version}))
        assert [r.name for r in again.answer(creds).message.resources] == ["ROOTCA"]  # type: ignore[union-attr]

    def test_the_wildcard_sends_everything(self, creds: Any) -> None:
        stream = DeltaStream(DEFAULTS, SecretCache(), counter())
        stream.receive(delta(["*"]))
        assert len(stream.answer(creds).message.resources) == 4  # type: ignore[union-attr]

    def test_a_resource_the_caller_no_longer_has_is_removed(self, creds: Any, ca: CertificateAuthority) -> None:
        stream = DeltaStream(DEFAULTS, SecretCache(), counter())
        stream.receive(delta(["spiffe://example.org/ns/default/sa/worker"]))
        stream.answer(creds)
        only_app = credentials_of([state("default", ca.issue_svid(), ca)])
        answer = stream.answer(only_app)
        assert answer is not None and list(answer.message.removed_resources) == [
            "spiffe://example.org/ns/default/sa/worker"
        ]
        assert stream.answer(only_app) is None

    def test_a_subscription_change_after_a_nack_is_no_nack_and_the_same_nack_counts_once(self, creds: Any) -> None:
        stream = DeltaStream(DEFAULTS, SecretCache(), counter())
        stream.receive(delta(["default"]))
        answer = stream.answer(creds)
        assert answer is not None
        assert stream.receive(delta(nonce=answer.nonce, error="rejected")).nack
        assert not stream.receive(delta(nonce=answer.nonce, error="rejected")).nack
        change = stream.receive(delta(["ROOTCA"]))
        assert not change.nack and not change.ack
        assert not stream.receive(delta(nonce="never-sent", error="rejected")).nack

    def test_an_ack_is_the_last_nonce_without_error_detail(self, creds: Any) -> None:
        stream = DeltaStream(DEFAULTS, SecretCache(), counter())
        stream.receive(delta(["default"]))
        answer = stream.answer(creds)
        assert answer is not None and stream.receive(delta(nonce=answer.nonce)).ack

    def test_names_the_caller_has_nothing_for_are_removed_a_bounded_batch_at_a_time(self, creds: Any) -> None:
        unknown = [f"spiffe://example.org/{i}/" + "x" * 1000 for i in range(200)]
        stream = DeltaStream(DEFAULTS, SecretCache(), counter())
        stream.receive(delta(["default", *unknown]))
        removed: list[str] = []
        for _ in range(10):
            answer = stream.answer(creds)
            if answer is None:
                break
            assert sum(map(len, answer.message.removed_resources)) <= MAX_REMOVED_BYTES
            removed += answer.message.removed_resources
        assert removed == unknown and not stream.more

    def test_a_subscription_over_the_state_limit_is_refused(self) -> None:
        stream = DeltaStream(DEFAULTS, SecretCache())
        batch = [f"{i:04}" + "x" * 2000 for i in range(512)]
        stream.receive(delta(batch[:256]))
        with pytest.raises(SdsRequestError, match=f"more than {MAX_STATE_BYTES} bytes"):
            stream.receive(delta(batch[256:] + [f"more-{i}" + "y" * 2000 for i in range(400)]))

    def test_initial_versions_are_checked_like_names(self) -> None:
        with pytest.raises(SdsRequestError, match="initial resource version longer"):
            DeltaStream(DEFAULTS, SecretCache()).receive(
                delta(["default"], initial_resource_versions={"a": "v" * 3000})
            )
        with pytest.raises(SdsRequestError, match="3000 characters"):
            DeltaStream(DEFAULTS, SecretCache()).receive(
                delta(["default"], initial_resource_versions={"a" * 3000: "v"})
            )


def test_sent_responses_remember_the_last_ones_and_count_a_nack_once() -> None:
    sent = SentResponses()
    for index in range(SENT_HISTORY + 1):
        sent.add(f"n{index}", f"v{index}", ("default",))
    assert sent.nack("n0") is None and sent.names("n0") is None  # forgotten: the oldest
    assert sent.nack("n1") == "v1" and sent.nack("n1") is None and sent.names("n1") == ("default",)


def test_an_answer_hands_out_each_identity_once_with_its_certificate(creds: Any) -> None:
    selection = select(DEFAULTS, ["default", APP, "ROOTCA", "spiffe://example.org/ns/default/sa/worker"], True, creds)
    handed = selection.handed_out  # `default` and APP are the same identity: the first resource stands for it
    assert [(r.identity, r.name) for r in handed] == [
        ("default", "default"),
        ("worker", "spiffe://example.org/ns/default/sa/worker"),
    ]
    assert handed[0].fingerprint == creds.identities[0].fingerprint and selection.resources[2].fingerprint == ""


def test_fetch_with_names_that_are_all_empty_answers_nothing(creds: Any) -> None:
    answer = fetch_answer(DEFAULTS, discovery_pb2.DiscoveryRequest(resource_names=[""]), creds, SecretCache())
    assert len(answer.message.resources) == 0


def test_fetch_answers_without_version_or_nonce(creds: Any) -> None:
    answer = fetch_answer(
        DEFAULTS, discovery_pb2.DiscoveryRequest(resource_names=["default", "x"]), creds, SecretCache()
    )
    assert answer.message.version_info == "" and answer.message.nonce == "" and len(answer.message.resources) == 1


def test_settings_refuse_an_empty_name() -> None:
    with pytest.raises(InvalidValue, match="default_bundle_name"):
        SdsSettings(default_bundle_name="")
