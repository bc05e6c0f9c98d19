"""Benchmark helper: run the emulated upstreams in their own process; print their URLs as JSON.
Runs until stdin closes."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import anyio

from wlidd.emulator.upstreams import Upstreams


async def main() -> None:
    upstreams = Upstreams(Path(tempfile.mkdtemp(prefix="wlidd-bench-")), metadata_lifetime=3600)
    async with anyio.create_task_group() as tg:
        await tg.start(upstreams.run)
        print(json.dumps({"metadata_url": upstreams.metadata_url, "ca_file": str(upstreams.ca_file)}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        upstreams.stop()


if __name__ == "__main__":
    anyio.run(main)
