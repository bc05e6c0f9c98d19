"""Issue 15 item 12: `wlidd check` validates token settings (files read and parsed, URLs, sink users), and a
token-only config is as valid for `check` as it is for `run`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli import run_cli
from wlidd.config import load_config
from wlidd.emulator.ca import CertificateAuthority, cert_pem, key_pem, new_key
from wlidd.errors import ConfigError


def token_only(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "wlidd.toml"
    path.write_text(f'[listeners.unix]\npath = "{tmp_path / "wlidd.sock"}"\n\n[tokens.gcp]\n{body}\n')
    return path


ENTRA = """flow = "entra-sts"
entra.tenant_id = "t"
entra.client_id = "c"
entra.scope = "api://AzureADTokenExchange/.default"
sts.audience = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/e"
"""


def test_a_token_only_config_passes_check(tmp_path: Path) -> None:
    result = run_cli("check", "--config", str(token_only(tmp_path, 'flow = "gce-metadata"')))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   token gcp: gce-metadata" in result.stdout


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "does not exist"), (b"not a certificate\n", "holds no usable CA certificate")],
    ids=["missing", "garbage"],
)
def test_a_ca_file_that_cannot_be_used_fails_check_naming_key_and_path(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_bytes(content)
    result = run_cli("check", "--config", str(token_only(tmp_path, f'flow = "gce-metadata"\nca_file = "{ca_file}"')))
    assert result.returncode == 1
    assert f"FAIL tokens.gcp.ca_file: {ca_file}: {reason}" in result.stdout


def test_a_good_ca_file_passes_check(tmp_path: Path, ca: CertificateAuthority) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.bundle_pem)
    result = run_cli("check", "--config", str(token_only(tmp_path, f'flow = "gce-metadata"\nca_file = "{ca_file}"')))
    assert result.returncode == 0, result.stdout


def test_entra_signer_files_are_read_and_checked(tmp_path: Path, ca: CertificateAuthority) -> None:
    rsa_key = new_key("rsa2048")
    cert = ca.issue_svid(key=rsa_key).leaf
    (tmp_path / "entra.crt").write_bytes(cert_pem(cert))
    (tmp_path / "entra.key").write_bytes(key_pem(rsa_key))
    (tmp_path / "other.key").write_bytes(key_pem(new_key("rsa2048")))
    (tmp_path / "ec.key").write_bytes(key_pem(new_key("ec256")))
    cases = {
        "entra.key": "",
        "other.key": "does not match the certificate",
        "ec.key": "need an RSA key",
        "none.key": "does not exist",
    }
    for key_name, expected in cases.items():
        body = ENTRA + f'entra.cert = "{tmp_path / "entra.crt"}"\nentra.key = "{tmp_path / key_name}"\n'
        result = run_cli("check", "--config", str(token_only(tmp_path, body)))
        if not expected:
            assert result.returncode == 0, result.stdout
            continue
        assert result.returncode == 1, result.stdout
        line = next(line for line in result.stdout.splitlines() if line.startswith("FAIL tokens.gcp.entra.key:"))
        assert str(tmp_path / key_name) in line and expected in line
        assert "PRIVATE KEY" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("key", "value"),
    [("metadata.url", "metadata.google.internal"), ("metadata.url", "ftp://x"), ("metadata.url", "http://")],
)
def test_an_upstream_url_without_http_scheme_or_host_is_a_config_error(tmp_path: Path, key: str, value: str) -> None:
    path = token_only(tmp_path, f'flow = "gce-metadata"\n{key} = "{value}"')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert f"tokens.gcp: {key} {value!r} must be an absolute http:// or https:// URL" in info.value.message
    assert run_cli("check", "--config", str(path)).returncode == 2


def test_a_token_sink_for_an_unknown_user_fails_check(tmp_path: Path) -> None:
    body = f'flow = "gce-metadata"\n[[tokens.gcp.sinks]]\npath = "{tmp_path / "token"}"\nreaders = {{ users = ["no-such-user-x"] }}'
    result = run_cli("check", "--config", str(token_only(tmp_path, body)))
    assert result.returncode == 1 and "no user 'no-such-user-x' (readers)" in result.stdout


def test_a_missing_ca_file_at_run_time_is_a_permanent_error_naming_the_path(tmp_path: Path) -> None:
    from wlidd.errors import UpstreamError
    from wlidd.tokens.flows.transports import upstream_ssl_context

    with pytest.raises(UpstreamError) as info:
        upstream_ssl_context(tmp_path / "gone.pem")
    assert info.value.reason == "wlidd_ca_file" and not info.value.retryable
    assert str(tmp_path / "gone.pem") in info.value.message
    (tmp_path / "junk.pem").write_text("junk\n")
    with pytest.raises(UpstreamError) as info:
        upstream_ssl_context(tmp_path / "junk.pem")
    assert "holds no usable CA certificate" in info.value.message
