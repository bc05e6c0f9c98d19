"""Per-caller authorization over the Unix socket: SO_PEERCRED, groups, per-name rules, audit, client."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import FileSet, in_background, request_as_user
from tests.test_tokens import metadata_token_config
from wlidd.client import AsyncClient, Client, ClientError
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.upstreams import Upstreams
from wlidd.logs import configure_logging, reset_logging

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid in a child needs root")


def request_as(uid: int, gid: int, sock: str, path: str) -> tuple[int, dict[str, Any]]:
    """GET `path` over the Unix socket from a child running as `uid`."""
    assert uid == gid
    status, body = request_as_user(uid, sock, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return status, json.loads(body)


def config(shared_dir: Path, files: FileSet, upstreams: Upstreams, policy: dict[str, Any] | None = None) -> Config:
    return Config.model_validate(
        {
            "identities": {"default": files.config()},
            "tokens": {"mds": metadata_token_config(upstreams), "other": metadata_token_config(upstreams)},
            "listeners": {"unix": {"path": str(shared_dir / "wlidd.sock"), "mode": "0666"}},
            "policy": policy or {},
        }
    )


async def ask(uid: int, d: Daemon, path: str) -> tuple[int, dict[str, Any]]:
    return await anyio.to_thread.run_sync(request_as, uid, uid, str(d.socket_path), path)


async def test_a_uid_not_allowed_is_refused_and_root_is_served(
    shared_dir: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(config(shared_dir, files, upstreams))
    async with in_background(d.run, d.stop):
        status, body = await ask(NOBODY, d, "/v1/token/mds")
        assert status == 403 and body["error"] == "forbidden"
        assert f"uid {NOBODY} (nobody)" in body["message"] and "token 'mds'" in body["message"]
        status, body = await ask(0, d, "/v1/token/mds")
        assert status == 200 and body["access_token"].startswith("ya29.mds-")
        status, _ = await ask(NOBODY, d, "/get_wif_token")
        assert status == 403
        status, body = await ask(NOBODY, d, "/v1/status")  # public information stays public
        assert status == 200 and body["identities"]["default"]["valid"] is True


async def test_credentials_are_denied_by_default_to_everyone_but_root(
    shared_dir: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    svid = ca.issue_svid()
    files.put(svid, ca.bundle_pem)
    d = Daemon(config(shared_dir, files, upstreams))
    async with in_background(d.run, d.stop):
        status, body = await ask(NOBODY, d, "/v1/credentials/default")
        assert (
            status == 403
            and "the credentials of 'default'" in body["message"]
            and "PRIVATE KEY" not in json.dumps(body)
        )
        status, body = await ask(0, d, "/v1/credentials/default")
    assert status == 200 and body["key_pem"].startswith("-----BEGIN PRIVATE KEY-----")
    assert (
        body["chain_pem"] == svid.chain_pem.decode() and body["spiffe_id"] == "spiffe://example.org/ns/default/sa/app"
    )


async def test_per_name_rules_replace_the_defaults_and_groups_count(
    shared_dir: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    policy = {
        "token": {"mds": {"users": ["nobody"]}, "other": {"groups": [NOBODY]}},
        "identity": {"default": {"users": [NOBODY]}},
    }
    d = Daemon(config(shared_dir, files, upstreams, policy))
    async with in_background(d.run, d.stop):
        assert (await ask(NOBODY, d, "/v1/token/mds"))[0] == 200
        assert (await ask(0, d, "/v1/token/mds"))[0] == 403  # the rule for mds names only nobody
        assert (await ask(NOBODY, d, "/v1/token/other"))[0] == 200  # allowed through its group
        assert (await ask(NOBODY, d, "/v1/credentials/default"))[0] == 200


async def test_policy_naming_an_unknown_token_is_a_config_error(
    shared_dir: Path, files: FileSet, upstreams: Upstreams
) -> None:
    with pytest.raises(ValueError, match="policy.token.nope: no token named 'nope'"):
        config(shared_dir, files, upstreams, {"token": {"nope": {"users": ["root"]}}})


async def test_audit_line_names_the_caller_never_the_token(
    shared_dir: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    try:
        files.put(ca.issue_svid(), ca.bundle_pem)
        d = Daemon(config(shared_dir, files, upstreams))
        async with in_background(d.run, d.stop):
            _, served = await ask(0, d, "/v1/token/mds")
            await ask(NOBODY, d, "/v1/token/mds")
            await ask(0, d, "/v1/credentials/default")
    finally:
        configure_logging("info", "console")
        reset_logging()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    handed = [line for line in lines if line["event"] == "token handed out"]
    denied = [line for line in lines if line["event"] == "access denied"]
    creds = [line for line in lines if line["event"] == "credentials handed out"]
    assert handed and handed[0]["uid"] == 0 and handed[0]["source"] == "mds" and handed[0]["route"] == "/v1/token/mds"
    assert denied and denied[0]["uid"] == NOBODY and denied[0]["user"] == "nobody"
    assert creds and creds[0]["identity"] == "default" and creds[0]["pid"] > 0
    assert served["access_token"] not in out.getvalue() and "PRIVATE KEY" not in out.getvalue()


async def test_python_clients_get_tokens_and_credentials(
    shared_dir: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    d = Daemon(config(shared_dir, files, upstreams))
    async with in_background(d.run, d.stop):
        async with AsyncClient(d.socket_path) as client:
            token = await client.get_token("mds")
            creds = await client.get_credentials("default")
            with pytest.raises(ClientError) as missing:
                await client.get_token("nope")

        def sync_calls() -> tuple[str, str]:
            with Client(d.socket_path) as sync_client:
                return sync_client.get_token("mds").access_token, sync_client.get_credentials("default").serial

        sync_token, sync_serial = await anyio.to_thread.run_sync(sync_calls)
    assert token.access_token.startswith("ya29.mds-") and sync_token == token.access_token
    assert token.token_type == "Bearer" and 0 < token.expires_in <= 3600
    assert creds.key_pem.startswith("-----BEGIN PRIVATE KEY-----") and sync_serial == creds.serial
    assert "PRIVATE KEY" not in repr(creds) and token.access_token not in repr(token)
    assert missing.value.status == 404 and missing.value.reason == "unknown_token"


async def test_cli_creds_writes_the_files_with_their_modes(
    shared_dir: Path, tmp_path: Path, files: FileSet, ca: CertificateAuthority, upstreams: Upstreams
) -> None:
    svid = ca.issue_svid()
    files.put(svid, ca.bundle_pem)
    d = Daemon(config(shared_dir, files, upstreams))
    out = tmp_path / "out"
    async with in_background(d.run, d.stop):
        result = await anyio.run_process(
            [sys.executable, "-m", "wlidd", "creds", "default", "--out", str(out), "--socket", str(d.socket_path)]
        )
    assert b"spiffe://example.org/ns/default/sa/app" in result.stdout
    assert (out / "svid.pem").read_bytes() == svid.chain_pem
    assert stat.S_IMODE(os.stat(out / "svid_key.pem").st_mode) == 0o600
    assert (out / "svid_bundle.pem").read_bytes() == ca.bundle_pem  # spiffe-helper's names
