"""Benchmark helper: a TLS 1.3 listener presenting one identity's current SVID (wlidd's watcher + hot context).

Usage: python bench/_tls_server.py LINK_PATH  — prints the port once it serves, runs until stdin closes.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import anyio
from anyio.streams.tls import TLSListener

from wlidd.config import parse_identity_config
from wlidd.logs import configure_logging
from wlidd.svid.load.source import CredentialSource
from wlidd.tlsctx import HotServerContext
from wlidd.watch import CredentialWatcher


async def main(link: Path) -> None:
    configure_logging("warning", "json", sys.stderr)
    config = parse_identity_config({"source": "gce", "dir": link, "mismatch_retry_delay": 0.2})
    watcher = CredentialWatcher("bench", CredentialSource("bench", config))
    hot = HotServerContext(watcher.current_tls)

    async def handle(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            with contextlib.suppress(Exception):
                await stream.receive()

    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = tcp.extra(anyio.abc.SocketAttribute.local_port)
        listener = TLSListener(tcp, hot.context, standard_compatible=False)
        tg.start_soon(listener.serve, handle)
        print(port, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        watcher.close()
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]))
