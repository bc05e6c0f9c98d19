"""Configuration: TOML + WLIDD_* env, durations, paths, and errors that name the key and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wlidd.config import config_path_from, load_config, parse_duration
from wlidd.errors import ConfigError
from wlidd.svid.load.plans import read_certificate_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wlidd.toml"
    path.write_text(text)
    return path


GCE = """
[identities.default]
source = "gce"
"""


def test_minimal_gce_identity_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GCE), {})
    identity = config.identities["default"]
    assert identity.gce_dir() == Path("/var/run/secrets/workload-spiffe-credentials")
    assert identity.reload_interval == 600 and identity.mismatch_retries == 4 and identity.mismatch_retry_delay == 5
    assert config.listeners.unix.path == Path("/run/wlidd/wlidd.sock") and config.listeners.unix.mode == 0o660
    assert config.daemon.log_level == "info"


@pytest.mark.parametrize(
    ("text", "seconds"), [(90, 90.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1.5", 1.5), ("250ms", 0.25)]
)
def test_durations_accept_seconds_and_suffixes(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10 minutes", "-5s", "", True, "1y"])
def test_bad_durations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_env_overrides_the_file_and_nests_with_double_underscore(tmp_path: Path) -> None:
    env = {"WLIDD_DAEMON__LOG_LEVEL": "debug", "WLIDD_IDENTITIES__DEFAULT__RELOAD_INTERVAL": "2m"}
    config = load_config(write(tmp_path, GCE + 'reload_interval = "5m"\n'), env)
    assert config.daemon.log_level == "debug"
    assert config.identities["default"].reload_interval == 120


def test_unknown_key_in_the_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GCE + "relaod_interval = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert f"{path}: identities.default.relaod_interval: unknown key" in str(info.value)


def test_bad_value_from_env_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GCE), {"WLIDD_DAEMON__LOG_LEVEL": "loud"})
    assert "environment WLIDD_DAEMON__LOG_LEVEL: daemon.log_level:" in str(info.value)


def test_unknown_top_level_env_variable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="WLIDD_LISTENER: unknown key 'listener'"):
        load_config(write(tmp_path, GCE), {"WLIDD_LISTENER": "x"})


def test_wlidd_config_variable_is_not_a_key(tmp_path: Path) -> None:
    load_config(write(tmp_path, GCE), {"WLIDD_CONFIG": "/somewhere"})


def test_files_source_requires_cert_key_and_bundle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[identities.web]\nsource = "files"\ncert = "/c.pem"\n'), {})
    assert "identities.web: source 'files' needs key, bundle" in str(info.value)


def test_unknown_source_is_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[identities.x]\nsource = "vault"\n'), {})
    assert "identities.x.source" in str(info.value) and "'gce'" in str(info.value)


def test_invalid_toml_says_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[identities\n"), {})


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml", {})


def test_paths_expand_tilde(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[identities.a]\nsource = "files"\ncert = "~/c"\nkey = "~/k"\nbundle = "~/b"\n'), {}
    )
    assert config.identities["a"].cert == Path.home() / "c"


def test_uppercase_trust_domain_in_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a trust domain"):
        load_config(write(tmp_path, GCE + 'trust_domain = "Example.org"\n'), {})


def test_socket_mode_is_octal(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GCE + '[listeners.unix]\nmode = "0600"\n'), {})
    assert config.listeners.unix.mode == 0o600
    with pytest.raises(ConfigError, match="listeners.unix.mode"):
        load_config(write(tmp_path, GCE + '[listeners.unix]\nmode = "rw-"\n'), {})


def test_config_path_precedence() -> None:
    assert config_path_from("/a.toml", {"WLIDD_CONFIG": "/b.toml"}) == Path("/a.toml")
    assert config_path_from(None, {"WLIDD_CONFIG": "/b.toml"}) == Path("/b.toml")
    assert config_path_from(None, {}) == Path("/etc/wlidd/wlidd.toml")


def test_certificate_config_path_comes_from_env_then_home(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[identities.a]\nsource = "certificate_config"\nbundle = "/b.pem"\n'), {})
    identity = config.identities["a"]
    assert identity.certificate_config_path({"GOOGLE_API_CERTIFICATE_CONFIG": "/x/cc.json"}) == Path("/x/cc.json")
    assert identity.certificate_config_path({}) == Path.home() / ".config/gcloud/certificate_config.json"


def test_certificate_config_workload_entry_is_read_and_other_entries_ignored(tmp_path: Path) -> None:
    path = tmp_path / "certificate_config.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "cert_configs": {
                    "workload": {"cert_path": "/w/certificates.pem", "key_path": "/w/private_key.pem"},
                    "keychain": {"issuer": "x"},
                },
                "libs": {"ecp": "/usr/lib/ecp"},
            }
        )
    )
    assert read_certificate_config(path) == (Path("/w/certificates.pem"), Path("/w/private_key.pem"))
    path.write_text(json.dumps({"cert_configs": {"workload": {"cert_path": "/c"}}}))
    with pytest.raises(ConfigError, match="cert_configs.workload.key_path"):
        read_certificate_config(path)


def test_two_sinks_in_one_place_are_refused_with_both_names(tmp_path: Path) -> None:
    path = tmp_path / "wlidd.toml"
    path.write_text(
        f"""
[identities.a]
source = "gce"
[[identities.a.sinks]]
dir = "{tmp_path}/creds"
[identities.b]
source = "gce"
[[identities.b.sinks]]
dir = "{tmp_path}/creds/"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "identities.b.sinks[0].dir" in info.value.message and "identities.a.sinks[0].dir" in info.value.message


def test_two_sinks_in_one_place_through_an_alias_are_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "varrun").symlink_to("run")
    path = tmp_path / "wlidd.toml"
    path.write_text(
        f"""
[identities.a]
source = "gce"
[[identities.a.sinks]]
dir = "{tmp_path}/run/app"
[[identities.a.sinks]]
dir = "{tmp_path}/varrun/app"
layout = "spiffe-helper"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "identities.a.sinks[1].dir" in info.value.message


def test_a_config_the_service_user_cannot_read_is_named_with_owner_mode_and_the_fix(shared_dir: Path) -> None:
    from wlidd.config import unreadable_by_service

    path = shared_dir / "wlidd.toml"
    path.write_text("")
    path.chmod(0o640)  # root:root 0640, as `make install` used to install it
    reason = unreadable_by_service(path, user="nobody")
    assert reason is not None and "mode 0640" in reason and "root:root" in reason and "chmod 0644" in reason
    path.chmod(0o644)
    assert unreadable_by_service(path, user="nobody") is None
    assert unreadable_by_service(path, user="no-such-user-x") is None  # no service user: nothing to judge


def test_a_trust_domain_with_a_final_newline_is_refused(tmp_path: Path) -> None:
    """The config checked trust domains with its own `^…$` regex, whose `$` also passes a final newline."""
    path = tmp_path / "wlidd.toml"
    path.write_text('[identities.default]\nsource = "gce"\ntrust_domain = "example.org\\n"\n')
    with pytest.raises(ConfigError, match="is not a trust domain"):
        load_config(path, {})


def test_a_certificate_config_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """It was read with Path.read_bytes: a FIFO with no writer blocked the reading thread (and with it the
    identity's reloads) forever. Now it is read as the credential files are: regular files only, capped."""
    import os

    from wlidd.svid.load.plans import MAX_CERTIFICATE_CONFIG_BYTES

    fifo = tmp_path / "certificate_config.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_certificate_config(fifo)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_CERTIFICATE_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        read_certificate_config(big)
