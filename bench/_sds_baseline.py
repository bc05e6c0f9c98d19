"""Benchmark helper: the baseline of bench/sds.py, bare watchfiles and a gRPC server pushing the same bytes.

Usage: python bench/_sds_baseline.py LINK_PATH SOCKET — serves StreamSecrets (grpcio, asyncio) on SOCKET
until stdin closes, printing "ready" once it serves. Every stream is pushed one DiscoveryResponse holding
the `default` tls_certificate (chain and key as read from the GCE-style directory behind LINK_PATH) when it
first asks and after every change watchfiles reports (debounce 50 ms, wlidd's default); requests after the
first (ACKs) are read and dropped. No validation, no caller identification, no policy, no nonce or version
logic: the floor under wlidd's SDS for the same work on the wire.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from watchfiles import awatch

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class Pusher:
    def __init__(self, link: Path) -> None:
        self.link = link
        self.response = b""
        self.changed = asyncio.Condition()
        self.version = 0

    def load(self) -> None:
        chain = (self.link / "certificates.pem").read_bytes()
        key = (self.link / "private_key.pem").read_bytes()
        certificate = common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=chain), private_key=base_pb2.DataSource(inline_bytes=key)
        )
        packed = any_pb2.Any()
        packed.Pack(secret_pb2.Secret(name="default", tls_certificate=certificate))
        self.version += 1
        self.response = discovery_pb2.DiscoveryResponse(
            version_info=str(self.version), type_url=SECRET, nonce=secrets.token_hex(8), resources=[packed]
        ).SerializeToString()

    async def watch(self) -> None:
        async for _ in awatch(self.link.parent, debounce=50, step=10, recursive=False):
            self.load()
            async with self.changed:
                self.changed.notify_all()

    async def stream_secrets(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        first = await anext(aiter(requests), None)
        if first is None:
            return

        async def drain() -> None:
            async for _ in requests:
                pass

        reader = asyncio.ensure_future(drain())
        try:
            while True:
                version = self.version
                await context.write(self.response)
                async with self.changed:
                    await self.changed.wait_for(lambda version=version: self.version != version)
        finally:
            reader.cancel()


async def main(link: Path, socket: Path) -> None:
    pusher = Pusher(link)
    pusher.load()
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100)])
    handler = grpc.stream_stream_rpc_method_handler(pusher.stream_secrets)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "envoy.service.secret.v3.SecretDiscoveryService", {"StreamSecrets": handler}
            )
        ]
    )
    os.umask(0)  # the bench's clients run as other uids
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    watcher = asyncio.ensure_future(pusher.watch())
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    watcher.cancel()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
