"""A sink whose write fails is reported where an operator looks, not only in the log: `/v1/status`
`sink_problems` (and `wlidd status`), the metric `wlidd_sink_write_failing{kind,owner}`, and `wlidd run
--oneshot`'s failures; the report goes once the sink is written again, or once a reload removes the sink."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.conftest import FileSet, in_background, wait_until
from tests.test_sink_ensure import config_file
from wlidd.cli.client_commands import render_status
from wlidd.config import load_config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.status import parse_status


async def status_of(socket: Path) -> dict[str, object]:
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket))) as client:
        answer = await client.get("http://wlidd/v1/status")
    document: dict[str, object] = json.loads(answer.content)
    return document


async def test_a_failing_sink_is_in_status_and_metrics_until_it_is_written_again(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    blocker = tmp_path / "run"
    blocker.write_text("a file where the sink's parent directory should be")
    out, socket = blocker / "creds", tmp_path / "wlidd.sock"
    path = config_file(tmp_path / "wlidd.toml", files, socket, f'\n[[identities.default.sinks]]\ndir = "{out}"\n')
    d = Daemon(load_config(path, {}), config_path=path, environ={})

    def failing() -> float | None:
        return d.metrics.registry.get_sample_value("wlidd_sink_write_failing", {"kind": "identity", "owner": "default"})

    async with in_background(d.run, d.stop):
        await wait_until(lambda: failing() == 1)
        document = await status_of(socket)
        problem = document["sink_problems"][str(out)]  # type: ignore[index]
        assert problem["kind"] == "identity" and problem["owner"] == "default"
        assert "Not a directory" in problem["error"] or "not a directory" in problem["error"].lower()
        assert f"SINK {out} (identity default): last write failed" in render_status(parse_status(document))

        blocker.unlink()  # the operator fixes it; the next check writes the sink
        await d.reload()
        await wait_until(lambda: (out / "key.pem").exists() and failing() is None)
        assert (await status_of(socket))["sink_problems"] == {}


async def test_a_sink_removed_by_a_reload_is_no_longer_reported(
    tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    socket = tmp_path / "wlidd.sock"
    sink = f'\n[[identities.default.sinks]]\ndir = "{blocker / "creds"}"\n'
    path = config_file(tmp_path / "wlidd.toml", files, socket, sink)
    d = Daemon(load_config(path, {}), config_path=path, environ={})
    async with in_background(d.run, d.stop):
        await wait_until(lambda: bool(d.sink_problems()))
        config_file(path, files, socket)  # the sink is gone from the config
        await d.reload()
        await wait_until(lambda: not d.sink_problems())
        assert (await status_of(socket))["sink_problems"] == {}
