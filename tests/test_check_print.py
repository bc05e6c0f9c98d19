"""`wlidd check --print`: the effective config as TOML that loads back to an equal Config, secrets never shown."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from wlidd.cli import main
from wlidd.config import Config, load_config
from wlidd.config_toml import REDACTED, config_toml

FULL = """
[daemon]
log_format = "json"

[identities.web]
source = "files"
cert = "~/certs/chain.pem"
key = "~/certs/key.pem"
bundle = "~/certs/bundle.pem"
bundles = {{ "other.org" = "/etc/wlidd/other.pem" }}
trust_domain = "example.org"
reload_interval = "10m"

[[identities.web.sinks]]
dir = "{out}/web"
layout = "spiffe-helper"
mode = "0640"
readers = {{ users = ["root", 0], groups = ["root"] }}
on_change = ["/usr/bin/systemctl", "reload", "app"]
on_change_timeout = "1m"

[identities.db]
source = "gce"
dir = "{out}/gce"
required = false

[tokens.zeta]
flow = "x509-sts"
identity = "web"
sts.audience = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x"
impersonate.service_account = "sa@project.iam.gserviceaccount.com"

[[tokens.zeta.sinks]]
path = "{out}/zeta.token"
format = "json"
mode = "0600"

[tokens.alpha]
flow = "gce-metadata"
on_demand = true

[listeners.unix]
path = "{out}/wlidd.sock"
mode = "0660"

[listeners.metadata]
token = "zeta"

[listeners.mtls]
identity = "web"
allow = ["spiffe://example.org/ns/*/sa/*"]

[policy.token.zeta]
users = ["root"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wlidd.toml"
    path.write_text(text.format(out=tmp_path))
    return path


def printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def load_printed(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "printed.toml"
    path.write_text(text)
    return load_config(path, {})


def test_the_printed_config_loads_back_equal_with_defaults_env_overrides_and_expanded_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defaults, WLIDD_* overrides and ~ expansion are in the printed TOML, which loads back to an equal Config,
    tables in their order (the first token is the one /get_wif_token serves)."""
    path = write(tmp_path, FULL)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WLIDD_DAEMON__LOG_LEVEL", "debug")
    monkeypatch.setenv("WLIDD_IDENTITIES__WEB__MISMATCH_RETRY_DELAY", "2s")
    effective = load_config(path)
    text = printed(["check", "--print", "--config", str(path)], capsys)
    document = tomllib.loads(text)
    assert document["daemon"]["log_level"] == "debug"  # from the environment
    assert document["identities"]["web"]["mismatch_retry_delay"] == 2.0
    assert document["identities"]["web"]["cert"] == f"{tmp_path}/home/certs/chain.pem"  # ~ expanded
    assert document["identities"]["web"]["sinks"][0]["mode"] == "0640"  # a mode as an operator writes it
    assert document["tokens"]["zeta"]["skew"] == 60.0  # a default filled in
    assert "~" not in text.split("\n\n", 1)[1] and REDACTED not in text  # the body, after the header
    monkeypatch.delenv("WLIDD_DAEMON__LOG_LEVEL")
    monkeypatch.delenv("WLIDD_IDENTITIES__WEB__MISMATCH_RETRY_DELAY")
    again = load_printed(tmp_path, text)
    assert again == effective
    assert list(again.tokens) == ["zeta", "alpha"] and list(again.identities) == ["web", "db"]


def test_print_reads_the_file_named_by_config_in_the_real_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wlidd check --print -c FILE` (the installed entry point) prints FILE's config, nothing else on stdout,
    without reading the credential files it names (none exist here), and exits 0."""
    path = write(tmp_path, FULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WLIDD_")} | {"HOME": str(tmp_path)}
    env["WLIDD_CONFIG"] = str(tmp_path / "not-this-one.toml")  # --config wins over WLIDD_CONFIG
    result = subprocess.run(
        [sys.executable, "-m", "wlidd", "check", "--print", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# wlidd effective configuration of {path}:")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ in the config expands the same here
    assert load_printed(tmp_path, result.stdout) == load_config(path, {})


def test_print_of_an_invalid_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid config is refused as by plain `check`: exit 2, the key named, no TOML printed."""
    path = write(tmp_path, '[daemon]\nlog_level = "loud"\n')
    assert main(["check", "--print", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "daemon.log_level" in captured.err


SECRETS = """
[identities.web]
source = "files"
cert = "/etc/wlidd/chain.pem"
key = "/etc/wlidd/key.pem"
bundle = "/etc/wlidd/bundle.pem"

[[identities.web.sinks]]
dir = "{out}/web"
on_change = ["/usr/local/bin/notify", "--header", "Authorization: Bearer s3cr3tB3arerT0kenValue", "--jwt",
  "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZWNyZXQtc3ViamVjdCJ9.c2lnbmF0dXJlLXNlY3JldA"]

[tokens.mds]
flow = "gce-metadata"
metadata.url = "http://proxy-user:hunter2-password@127.0.0.1:8080"
"""


def test_secret_values_never_appear_and_the_config_loads_back_equal_but_for_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL's userinfo and on_change arguments holding a bearer token or a JWT are printed as <redacted>
    (the URL keeps its host, so it still validates); the header says so; what loads back equals
    the config with exactly those values replaced."""
    path = write(tmp_path, SECRETS)
    text = printed(["check", "--print", "--config", str(path)], capsys)
    for secret in ("hunter2", "s3cr3tB3arer", "eyJhbGciOiJSUzI1NiJ9", "c2lnbmF0dXJlLXNlY3JldA"):
        assert secret not in text
    assert f'Secrets are shown as "{REDACTED}"' in text
    original = load_config(path, {}).model_dump()
    original["tokens"]["mds"]["metadata"]["url"] = f"http://{REDACTED}@127.0.0.1:8080"  # a user may be a token
    on_change = original["identities"]["web"]["sinks"][0]["on_change"]
    original["identities"]["web"]["sinks"][0]["on_change"] = (*on_change[:2], REDACTED, on_change[3], REDACTED)
    assert load_printed(tmp_path, text).model_dump() == original


def test_secret_typed_fields_are_printed_redacted_whole() -> None:
    """A SecretStr field (none in Config today; a future client secret would be one) never shows its value."""

    class Entra(BaseModel):
        client_id: str
        client_secret: SecretStr

    class Settings(BaseModel):
        entra: Entra

    text = config_toml(Settings(entra=Entra(client_id="app", client_secret=SecretStr("very-secret-value"))))
    assert "very-secret-value" not in text
    assert tomllib.loads(text.split("\n\n", 1)[1]) == {"entra": {"client_id": "app", "client_secret": REDACTED}}
    assert f'Secrets are shown as "{REDACTED}"' in text


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for info in model.model_fields.values():
        stack: list[Any] = [info.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                _models(annotation, seen)
            stack.extend(typing.get_args(annotation))


def test_every_field_that_may_be_none_defaults_to_none_so_leaving_it_out_prints_it_faithfully() -> None:
    """TOML has no null: a None value is left out of the printed config, which is right only while every
    field that may hold None defaults to None (a new field defaulting to something else breaks this test)."""
    seen: set[type[BaseModel]] = set()
    _models(Config, seen)
    wrong = [
        f"{model.__name__}.{name}"
        for model in seen
        for name, info in model.model_fields.items()
        if type(None) in typing.get_args(info.annotation)
        and not (info.default is None and info.default_factory is None)
    ]
    assert len(seen) > 10 and wrong == []


LEAKS = """
[identities.web]
source = "files"
cert = "/etc/wlidd/chain.pem"
key = "/etc/wlidd/key.pem"
bundle = "/etc/wlidd/bundle.pem"

[[identities.web.sinks]]
dir = "{out}/web"
on_change = ["/usr/bin/curl", "-u", "deploy:hunter2hunter2", "-H", "X-Vault-Token: hvs.CAESIsecretvault",
  "https://hooks.example/notify?token=s3cr3tQueryValue", "--password=pa55word-value", "api_key=k3yv4lue"]

[tokens.gcp]
flow = "entra-sts"
identity = "web"
entra = {{ tenant_id = "t", client_id = "c", scope = "api://x/.default" }}
sts = {{ audience = "//iam.googleapis.com/x", url = "https://sts.example/v1/token?key=AIzaSyS3cretApiKey" }}
impersonate = {{ service_account = "sa@p.iam.gserviceaccount.com", url = "https://ghp_T0kenAsUser@iam.example/v1" }}
"""


def test_secrets_in_urls_and_hook_arguments_are_redacted_wherever_they_sit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a tester: a URL's query (`?key=`), a token given as a URL's user, and hook arguments
    after `-u` / `-H`, `--password=`, `api_key=` were printed in clear. Names and structure stay."""
    path = write(tmp_path, LEAKS)
    text = printed(["check", "--print", "--config", str(path)], capsys)
    for secret in ("hunter2", "hvs.CAES", "s3cr3tQuery", "pa55word", "k3yv4lue", "AIzaSy", "ghp_T0ken"):
        assert secret not in text, secret
    assert "/usr/bin/curl" in text and "https://hooks.example/notify?token=" in text
    load_printed(tmp_path, text)  # still a valid config


def test_a_bad_url_error_does_not_print_its_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[tokens.m]\nflow = "gce-metadata"\nmetadata.url = "http://user:TopSecretPw@host:99999"\n')
    assert main(["check", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "metadata.url" in captured.err and "TopSecretPw" not in captured.out + captured.err


def test_a_config_file_name_with_a_newline_keeps_the_header_one_comment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "odd\nname.toml"
    path.write_text('[tokens.m]\nflow = "gce-metadata"\n')
    text = printed(["check", "--print", "--config", str(path)], capsys)
    load_printed(tmp_path, text)
