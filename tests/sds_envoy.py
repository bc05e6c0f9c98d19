"""Envoy's SDS client side, played with grpcio (asyncio) and xds-protos, for tests against a real daemon.

    python -m tests.sds_envoy SOCKET [--uid UID]

Run as root, it imports everything it needs, then (with --uid) drops to that uid/gid with no supplementary
groups: a CI checkout is not readable by other users. It reads commands from stdin and writes events to
stdout, one JSON object a line; it never prints key material, only digests of it.

Commands:
    {"op": "open", "stream": S, "kind": "sotw" | "delta", "channel": C}   a StreamSecrets / DeltaSecrets call
                                                  on channel C (default 0; each channel is one connection)
    {"op": "send", "stream": S, ...request}       one request, built as Envoy builds it (`request`): names,
                                                  version, nonce, error, type_url, node (a dict of id, cluster,
                                                  metadata, version; false: none), subscribe, unsubscribe,
                                                  initial (delta), pad ([count, length]: that many more names)
    {"op": "ack", "stream": S}                    what Envoy sends after applying a response: the same names,
                                                  the response's version_info and nonce, the node
    {"op": "nack", "stream": S, "error": TEXT}    what Envoy sends after failing to apply one: the last
                                                  accepted version_info, the response's nonce, error_detail
    {"op": "close", "stream": S}                  half-close (Envoy's stream end)
    {"op": "fetch", "stream": S, ...request}      one FetchSecrets call
    {"op": "many", "count": N, "first": S, "names": [...], "ack": true}   N SotW streams at once, one
                                                  connection per 50, each acking what it receives
Events:
    {"stream": S, "event": "response", "version": V, "nonce": N, "resources": [...], "removed": [...]}
    {"stream": S, "event": "end", "code": "OK" | "PERMISSION_DENIED" | ..., "details": TEXT}
    {"event": "ready"} once commands are read
Each resource: {"name", "type", "chain_sha256", "key_sha256"} for a tls_certificate, {"name", "type",
"trusted_ca_sha256"} or {"name", "type", "validator", "trust_domains": {td: bundle_sha256}} for a
validation_context; a delta resource also has its "version".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.type.v3 import semantic_version_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def node(spec: dict[str, Any] | None) -> Any:
    """An Envoy node: id, cluster, metadata, user agent and build version (1.30.1 unless told)."""
    spec = spec or {}
    metadata = struct_pb2.Struct()
    metadata.update(spec.get("metadata", {}))
    major, minor = spec.get("version", (1, 30))
    return base_pb2.Node(
        id=spec.get("id", "envoy-test"),
        cluster=spec.get("cluster", "test-cluster"),
        metadata=metadata,
        user_agent_name="envoy",
        user_agent_build_version=base_pb2.BuildVersion(
            version=semantic_version_pb2.SemanticVersion(major_number=major, minor_number=minor, patch=1)
        ),
    )


def request(spec: dict[str, Any], kind: str) -> Any:
    """A DiscoveryRequest (or DeltaDiscoveryRequest) from a command's fields."""
    error = status_pb2.Status(code=3, message=spec["error"]) if spec.get("error") else None
    if kind == "delta":
        message = discovery_pb2.DeltaDiscoveryRequest(
            type_url=spec.get("type_url", SECRET),
            resource_names_subscribe=spec.get("subscribe", []),
            resource_names_unsubscribe=spec.get("unsubscribe", []),
            initial_resource_versions=spec.get("initial", {}),
            response_nonce=spec.get("nonce", ""),
        )
    else:
        count, length = spec.get("pad", (0, 0))  # `count` more names of `length` characters (an oversized request)
        message = discovery_pb2.DiscoveryRequest(
            type_url=spec.get("type_url", SECRET),
            resource_names=spec.get("names", [])
            + [f"spiffe://example.org/{i:04d}/" + "x" * length for i in range(count)],
            version_info=spec.get("version", ""),
            response_nonce=spec.get("nonce", ""),
        )
    if spec.get("node", True) is not False:
        message.node.CopyFrom(node(spec.get("node") if isinstance(spec.get("node"), dict) else None))
    if error is not None:
        message.error_detail.CopyFrom(error)
    return message


def describe(packed: Any, version: str | None = None) -> dict[str, Any]:
    secret = secret_pb2.Secret()
    packed.Unpack(secret)
    out: dict[str, Any] = {"name": secret.name, "type": secret.WhichOneof("type")}
    if version is not None:
        out["version"] = version
    if secret.HasField("tls_certificate"):
        out["chain_sha256"] = sha(secret.tls_certificate.certificate_chain.inline_bytes)
        out["key_sha256"] = sha(secret.tls_certificate.private_key.inline_bytes)
    elif secret.validation_context.HasField("custom_validator_config"):
        validator = secret.validation_context.custom_validator_config
        config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
        validator.typed_config.Unpack(config)
        out["validator"] = validator.name
        out["typed_config"] = validator.typed_config.type_url
        out["trust_domains"] = {td.name: sha(td.trust_bundle.inline_bytes) for td in config.trust_domains}
        out["trust_domain_order"] = [td.name for td in config.trust_domains]
    else:
        out["trusted_ca_sha256"] = sha(secret.validation_context.trusted_ca.inline_bytes)
    return out


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Client:
    def __init__(self, target: str) -> None:
        self.target = target
        self.channels: dict[int, grpc.aio.Channel] = {}
        self.calls: dict[Any, Any] = {}
        self.kinds: dict[Any, str] = {}
        self.last: dict[Any, dict[str, Any]] = {}  # per stream: names, accepted version, last response
        self.tasks: set[asyncio.Task[None]] = set()

    def channel(self, number: int) -> grpc.aio.Channel:
        if number not in self.channels:  # a separate connection each (no subchannel sharing)
            self.channels[number] = grpc.aio.insecure_channel(
                self.target, options=[("grpc.use_local_subchannel_pool", 1), ("wlidd.test.channel", number)]
            )
        return self.channels[number]

    def open(self, stream: Any, kind: str, channel: int = 0, auto_ack: bool = False) -> None:
        method = "DeltaSecrets" if kind == "delta" else "StreamSecrets"
        response_type = discovery_pb2.DeltaDiscoveryResponse if kind == "delta" else discovery_pb2.DiscoveryResponse
        call = self.channel(channel).stream_stream(
            f"{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )()
        self.calls[stream], self.kinds[stream] = call, kind
        self.last[stream] = {"names": [], "accepted": "", "nonce": ""}
        self.spawn(self.follow(stream, call, kind, auto_ack))

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def follow(self, stream: Any, call: Any, kind: str, auto_ack: bool) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                state = self.last[stream]
                state["nonce"] = response.nonce
                if kind == "delta":
                    resources = [describe(r.resource, r.version) for r in response.resources]
                    version = response.system_version_info
                else:
                    resources = [describe(r) for r in response.resources]
                    version = response.version_info
                    state["offered"] = version
                emit(
                    {
                        "stream": stream,
                        "event": "response",
                        "version": version,
                        "nonce": response.nonce,
                        "type_url": response.type_url,
                        "resources": resources,
                        "removed": list(getattr(response, "removed_resources", [])),
                    }
                )
                if auto_ack:
                    await self.ack(stream)
            code = await call.code()
            emit({"stream": stream, "event": "end", "code": code.name, "details": await call.details()})
        except grpc.aio.AioRpcError as exc:
            emit({"stream": stream, "event": "end", "code": exc.code().name, "details": exc.details()})

    async def write(self, stream: Any, message: Any) -> None:
        """Write to a call; a call the server already ended refuses it (its end is reported by `follow`)."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.calls[stream].write(message)

    async def send(self, stream: Any, spec: dict[str, Any]) -> None:
        kind = self.kinds[stream]
        if "names" in spec:
            self.last[stream]["names"] = spec["names"]
        if isinstance(spec.get("node"), dict):  # Envoy sends the same node on every request of a stream
            self.last[stream]["node"] = spec["node"]
        await self.write(stream, request(spec, kind))

    async def ack(self, stream: Any, error: str | None = None) -> None:
        state = self.last[stream]
        if self.kinds[stream] == "delta":
            spec: dict[str, Any] = {"nonce": state["nonce"], "node": False}
        else:
            if error is None:
                state["accepted"] = state.get("offered", "")
            spec = {"names": state["names"], "version": state["accepted"], "nonce": state["nonce"]}
            spec["node"] = state.get("node", True)
        if error is not None:
            spec["error"] = error
        await self.write(stream, request(spec, self.kinds[stream]))

    async def fetch(self, stream: Any, spec: dict[str, Any]) -> None:
        call = self.channel(spec.get("channel", 0)).unary_unary(
            f"{SERVICE}/FetchSecrets",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        try:
            response = await call(request(spec, "sotw"), timeout=10)
        except grpc.aio.AioRpcError as exc:
            emit({"stream": stream, "event": "end", "code": exc.code().name, "details": exc.details()})
            return
        resources = [describe(r) for r in response.resources]
        emit(
            {
                "stream": stream,
                "event": "response",
                "version": response.version_info,
                "nonce": response.nonce,
                "type_url": response.type_url,
                "resources": resources,
                "removed": [],
            }
        )

    async def command(self, order: dict[str, Any]) -> None:
        op, stream = order["op"], order.get("stream")
        if op == "open":
            self.open(stream, order.get("kind", "sotw"), order.get("channel", 0), order.get("auto_ack", False))
        elif op == "send":
            await self.send(stream, order)
        elif op == "ack":
            await self.ack(stream)
        elif op == "nack":
            await self.ack(stream, error=order["error"])
        elif op == "close":
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self.calls[stream].done_writing()
        elif op == "fetch":
            await self.fetch(stream, order)
        elif op == "many":
            for index in range(order["count"]):
                name = order["first"] + index
                self.open(name, "sotw", channel=1000 + index // 50, auto_ack=order.get("ack", True))
                await self.send(name, {"names": order["names"]})
        else:
            raise SystemExit(f"unknown op {op!r}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--uid", type=int)
    args = parser.parse_args()
    if args.uid is not None:
        os.setgroups([])
        os.setgid(args.uid)
        os.setuid(args.uid)
    client = Client(f"unix://{args.socket}")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit({"event": "ready"})
    while line := await reader.readline():
        await client.command(json.loads(line))
    for channel in client.channels.values():
        await channel.close()


if __name__ == "__main__":
    asyncio.run(main())
