"""Loading the config without pydantic-settings when nothing needs it: a file alone validates as it would
through pydantic-settings (the same Config, the same `wlidd check --print`, the same error lines), and the
daemon does not import pydantic-settings unless a WLIDD_* variable is set. Also the listeners' key order
(own keys, then the shared connection limits) and the service-user check along the path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wlidd.config import (
    Config,
    MetadataListenerConfig,
    MetricsListenerConfig,
    MtlsListenerConfig,
    UnixListenerConfig,
    WorkloadApiListenerConfig,
    load_config,
    unreadable_by_service,
)
from wlidd.config import load as loading
from wlidd.config_toml import config_toml
from wlidd.errors import ConfigError

GCE = '[identities.default]\nsource = "gce"\n'
TOKEN = '[tokens.t]\nflow = "x509-sts"\nidentity = "default"\nsts.audience = "a"\n'

# Files as operators write them, good and bad: each must load (or fail) the same with and without
# pydantic-settings.
DOCUMENTS = {
    "empty": "",
    "gce": GCE,
    "everything": GCE
    + TOKEN
    + 'impersonate.service_account = "sa@p.iam.gserviceaccount.com"\nsts.url = "https://u:p@sts.example/t?key=1"\n'
    + '[[tokens.t.sinks]]\npath = "~/token"\nmode = "0640"\non_change = ["curl", "-u", "u:p", "https://h/"]\n'
    + '[[identities.default.sinks]]\ndir = "/run/app/creds"\nlayout = "spiffe-helper"\nreaders.users = ["app", 1000]\n'
    + '[listeners.unix]\nmode = "0600"\nmax_connections = 10\n'
    + '[listeners.mtls]\nidentity = "default"\nallow = ["spiffe://example.org/**"]\nidle_timeout = "2m"\n'
    + '[listeners.metadata]\ntoken = "t"\n[listeners.metrics]\naddress = "0.0.0.0:9464"\n'
    + '[listeners.workload_api]\npath = "/run/w.sock"\n[policy.token.t]\nusers = ["app"]\n'
    + '[daemon]\nlog_level = "debug"\nruntime_dir = "~/run"\n',
    "a top-level key in another case": '[Daemon]\nlog_level = "debug"\n',
    "an unknown top-level key": GCE + "[identity]\nx = 1\n",
    "a variant's missing keys": '[identities.web]\nsource = "files"\ncert = "/c.pem"\n',
    "another variant's key": GCE + 'cert = "/c.pem"\n',
    "bad listener values": GCE
    + '[listeners.unix]\nmax_connections = 0\nidle_timeout = "soon"\n'
    + '[listeners.mtls]\nidentity = "nope"\nallow = []\nmax_connections_per_caller = 0\n',
    "a cross-table reference": GCE + '[policy.token.nope]\nusers = ["a"]\n',
}


def through_pydantic_settings(path: Path, monkeypatch: pytest.MonkeyPatch) -> Config | str:
    """`load_config` with pydantic-settings reading the file, as before it was imported lazily."""
    with monkeypatch.context() as patch:
        patch.setattr(loading, "_settings_needed", lambda *_: True)
        return loaded(path)


def loaded(path: Path) -> Config | str:
    try:
        return load_config(path, {})
    except ConfigError as exc:
        return exc.message


@pytest.mark.parametrize("text", DOCUMENTS.values(), ids=DOCUMENTS.keys())
def test_a_file_alone_loads_as_pydantic_settings_loads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    path = tmp_path / "wlidd.toml"
    path.write_text(text)
    direct, settings = loaded(path), through_pydantic_settings(path, monkeypatch)
    assert direct == settings
    if isinstance(direct, Config) and isinstance(settings, Config):
        assert direct.model_fields_set == settings.model_fields_set
        assert config_toml(direct, source=str(path)) == config_toml(settings, source=str(path))


PROBE = """
import json, sys
from pathlib import Path
from wlidd.config import load_config
config = load_config(Path(sys.argv[1]), json.loads(sys.argv[2]))
print(json.dumps({"settings": "pydantic_settings" in sys.modules, "log_level": config.daemon.log_level}))
"""


def load_in_a_fresh_interpreter(path: Path, environ: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), json.dumps(environ)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_file_without_wlidd_variables_loads_without_importing_pydantic_settings(tmp_path: Path) -> None:
    path = tmp_path / "wlidd.toml"
    path.write_text(GCE + '[daemon]\nlog_level = "warning"\n')
    loaded = load_in_a_fresh_interpreter(path, {"WLIDD_CONFIG": str(path)})
    assert loaded == {"settings": False, "log_level": "warning"}


@pytest.mark.parametrize("name", ["WLIDD_DAEMON__LOG_LEVEL", "wlidd_daemon__log_level"])
def test_a_wlidd_variable_in_any_case_is_applied_through_pydantic_settings(tmp_path: Path, name: str) -> None:
    path = tmp_path / "wlidd.toml"
    path.write_text(GCE + '[daemon]\nlog_level = "warning"\n')
    assert load_in_a_fresh_interpreter(path, {name: "debug"}) == {"settings": True, "log_level": "debug"}


def test_each_listener_lists_its_own_keys_then_its_connection_limits() -> None:
    """The order `wlidd check --print` writes them in (and the docs show): the listener's own keys first."""
    limits = ["max_connections", "max_connections_per_caller", "first_byte_timeout", "request_timeout", "idle_timeout"]
    assert list(UnixListenerConfig.model_fields) == ["path", "mode", "owner", "group", *limits]
    assert list(MetadataListenerConfig.model_fields) == [
        *("address", "token", "email", "project_id", "numeric_project_id", "universe_domain"),
        *limits,
    ]
    assert list(MtlsListenerConfig.model_fields) == ["address", "identity", "allow", *limits]
    assert list(MetricsListenerConfig.model_fields) == ["address", *limits]
    workload = ["path", "mode", "owner", "group", *limits[:3], "max_calls_per_caller", "sds"]
    assert list(WorkloadApiListenerConfig.model_fields) == workload
    metrics, unix = MetricsListenerConfig(), UnixListenerConfig()
    assert (metrics.max_connections, metrics.max_connections_per_caller) == (64, 16)
    assert (unix.max_connections, unix.max_connections_per_caller) == (256, 64)


def test_a_directory_the_service_user_cannot_traverse_is_named(shared_dir: Path) -> None:
    closed = shared_dir / "closed"
    closed.mkdir(mode=0o700)
    path = closed / "wlidd.toml"
    path.write_text("")
    path.chmod(0o644)
    reason = unreadable_by_service(path, user="nobody")
    assert reason is not None and f"directory {closed} (" in reason and "mode 0700" in reason
    assert "cannot be traversed by user nobody" in reason
    closed.chmod(0o755)
    assert unreadable_by_service(path, user="nobody") is None


@pytest.mark.parametrize("environ", [{}, {"WLIDD_DAEMON__LOG_LEVEL": "debug"}], ids=["file alone", "with env"])
def test_a_config_from_a_pipe_is_read_once_and_loads_what_was_written(tmp_path: Path, environ: dict[str, str]) -> None:
    """`wlidd check --config <(generate)`: a FIFO can be read only once. pydantic-settings read the path
    again after wlidd had, so with a WLIDD_* variable the file's contents were lost and the config loaded
    as if the file were empty (defaults, no identity) instead of what was written."""
    import os
    import threading

    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    text = GCE + '[daemon]\nlog_format = "json"\n'
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    try:
        config = load_config(fifo, environ)
    finally:
        writer.join(10)
    assert list(config.identities) == ["default"]
    assert config.daemon.log_format == "json"
    assert config.daemon.log_level == environ.get("WLIDD_DAEMON__LOG_LEVEL", config.daemon.log_level)
