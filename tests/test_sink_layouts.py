"""Credential sink layouts (issue 14, items 10 and 11): one naming scheme each, loadable by the consumers that
use those names (py-spiffe, OpenSSL, Python's ssl), and `wlidd creds --out` writing through the same code."""

from __future__ import annotations

import os
import re
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.conftest import TD, FileSet, in_background
from tests.test_hostile_sinks import identity_state, sink
from wlidd.config import Config
from wlidd.daemon import Daemon
from wlidd.emulator.ca import CertificateAuthority, cert_pem
from wlidd.errors import InvalidValue
from wlidd.sinks.credentials import write_credentials
from wlidd.sinks.layouts import Material, SinkFile, layout_files

SPIFFE_ID = "spiffe://example.org/ns/default/sa/app"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\n.*?\n-----END \1-----\n", re.S)

# layout → (chain file, key file, own trust domain's bundle file); the key file is the chain file for spiffe-fs
NAMES = {
    "files": ("cert.pem", "key.pem", "bundle.pem"),
    "spiffe-helper": ("svid.pem", "svid_key.pem", "svid_bundle.pem"),
    "spiffe-fs": (
        "credential-bundle.private-key.pem",
        "credential-bundle.private-key.pem",
        f"{TD}.spiffe-trust-bundle.pem",
    ),
}


def stable_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".."))


def split_blocks(data: bytes) -> tuple[bytes, bytes]:
    """A credential bundle read once (SPIFFE Filesystem Delivery draft, 3.2), split into its PRIVATE KEY block
    and its CERTIFICATE blocks; nothing else may be in it (2.1: no other block types, no data between)."""
    blocks = _PEM_BLOCK.findall(data)
    assert b"".join(m.group(0) for m in _PEM_BLOCK.finditer(data)) == data, "data outside the PEM blocks"
    assert blocks[0] == b"PRIVATE KEY" and set(blocks[1:]) == {b"CERTIFICATE"}
    spans = [m.group(0) for m in _PEM_BLOCK.finditer(data)]
    return spans[0], b"".join(spans[1:])


PY_SPIFFE = r"""
import re, sys
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import TrustDomain, X509Bundle, X509Svid

chain_file, key_file, bundle_file, trust_domain = sys.argv[1:5]
if chain_file == key_file:  # one file: read once (the draft's 3.2), split into the key and the chain
    spans = [m.group(0) for m in re.finditer(rb"-----BEGIN ([A-Z ]+)-----\n.*?\n-----END \1-----\n",
             open(chain_file, "rb").read(), re.S)]
    svid = X509Svid.parse(b"".join(spans[1:]), spans[0])
else:
    svid = X509Svid.load(chain_file, key_file, Encoding.PEM)
bundle = X509Bundle.load(TrustDomain(trust_domain), bundle_file, Encoding.PEM)
print(svid.spiffe_id, len(svid.cert_chain), len(bundle.x509_authorities))
"""


def py_spiffe_load(chain_file: Path, key_file: Path, bundle_file: Path) -> str:
    """What py-spiffe makes of the files: `<SPIFFE ID> <chain length> <authorities>`. In a child process:
    its generated protobuf module registers the same global names as wlidd's Workload API module."""
    command = [sys.executable, "-c", PY_SPIFFE, str(chain_file), str(key_file), str(bundle_file), TD]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("layout", sorted(NAMES))
def test_each_layout_is_loaded_by_py_spiffe_openssl_and_ssl(
    tmp_path: Path, ca: CertificateAuthority, layout: str
) -> None:
    out = tmp_path / layout
    svid = ca.issue_svid()
    write_credentials(sink(out, layout=layout), identity_state(svid, ca.bundle_pem))
    chain_name, key_name, bundle_name = NAMES[layout]
    chain_file, key_file, bundle_file = out / chain_name, out / key_name, out / bundle_name

    # py-spiffe: separate files load as they are; the single file is read once and split (the draft's 3.2)
    if chain_file == key_file:
        split_blocks(chain_file.read_bytes())  # nothing but one PRIVATE KEY block, then CERTIFICATE blocks
    assert py_spiffe_load(chain_file, key_file, bundle_file) == f"{SPIFFE_ID} {len(svid.chain)} 1"
    assert bundle_file.read_bytes() == cert_pem(ca.root)

    # OpenSSL: the chain verifies to the bundle; the leaf carries the SPIFFE ID; the key is the leaf's
    verified = openssl("verify", "-CAfile", str(bundle_file), "-untrusted", str(chain_file), str(chain_file))
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified.stderr
    san = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", str(chain_file))
    assert f"URI:{SPIFFE_ID}" in san.stdout
    leaf_key = openssl("x509", "-noout", "-pubkey", "-in", str(chain_file)).stdout
    assert leaf_key and openssl("pkey", "-pubout", "-in", str(key_file)).stdout == leaf_key

    # Python's ssl: a context takes the pair (OpenSSL checks that the key matches the leaf)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(chain_file, None if key_file == chain_file else key_file)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_each_layout_has_its_own_names_and_no_name_means_two_things(
    tmp_path: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    """svid.pem is the chain alone wherever it appears (spiffe-helper's meaning); the single file with key
    and chain has the draft's name."""
    svid = ca.issue_svid()
    state = identity_state(svid, ca.bundle_pem)
    for layout in NAMES:
        write_credentials(sink(tmp_path / layout, layout=layout), state)
    assert stable_names(tmp_path / "files") == ["bundle.pem", "cert.pem", "certificate_config.json", "key.pem"]
    assert stable_names(tmp_path / "spiffe-helper") == ["svid.pem", "svid_bundle.pem", "svid_key.pem"]
    assert stable_names(tmp_path / "spiffe-fs") == [NAMES["spiffe-fs"][0], NAMES["spiffe-fs"][2]]
    assert (tmp_path / "spiffe-helper" / "svid.pem").read_bytes() == svid.chain_pem
    assert (tmp_path / "spiffe-helper" / "svid_key.pem").read_bytes() == svid.key_pem
    assert (tmp_path / "spiffe-fs" / NAMES["spiffe-fs"][0]).read_bytes() == svid.key_pem + svid.chain_pem


def test_spiffe_helper_appends_federated_roots_only_with_include_federated_domains(
    tmp_path: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    """As spiffe-helper does (pkg/disk/x509.go): the own trust domain's roots, then the other domains'."""
    material = Material(b"key", ca.issue_svid().chain_pem, TD, ca.bundle_pem, (("other.org", foreign_ca.bundle_pem),))
    plain = {f.name: f.data for f in layout_files("spiffe-helper", material, tmp_path)}
    federated = {
        f.name: f.data for f in layout_files("spiffe-helper", material, tmp_path, include_federated_domains=True)
    }
    assert plain["svid_bundle.pem"] == ca.bundle_pem
    assert federated["svid_bundle.pem"] == ca.bundle_pem + foreign_ca.bundle_pem
    fs = {f.name: f.data for f in layout_files("spiffe-fs", material, tmp_path)}
    assert fs["other.org.spiffe-trust-bundle.pem"] == foreign_ca.bundle_pem


def test_the_spiffe_fs_credential_bundle_leaves_out_a_trust_anchor_the_chain_carried(ca: CertificateAuthority) -> None:
    """The draft (2.1): the chain "MUST NOT contain the trust anchor"; a source whose chain ends with the root
    still gives a conforming file. The other layouts hand the chain on as it came."""
    svid = ca.issue_svid()
    with_root = svid.chain_pem + cert_pem(ca.root)
    material = Material(svid.key_pem, with_root, TD, ca.bundle_pem)
    [bundle, _] = layout_files("spiffe-fs", material, Path("/x"))
    assert bundle.data == svid.key_pem + svid.chain_pem
    assert {f.name: f.data for f in layout_files("spiffe-helper", material, Path("/x"))}["svid.pem"] == with_root


def test_the_key_is_first_and_the_only_secret_whatever_the_modes(ca: CertificateAuthority) -> None:
    """Which file holds the key is part of the layout, not guessed from modes: with mode == key_mode (0600
    both) the key is still the first file and the only one marked secret (item 10)."""
    material = Material(b"k", ca.issue_svid().chain_pem, TD, ca.bundle_pem)
    for layout, (_, key_name, _) in NAMES.items():
        files = layout_files(layout, material, Path("/x"), mode=0o600, key_mode=0o600)
        assert [f.name for f in files if f.secret] == [key_name] and files[0].name == key_name
        assert {f.mode for f in files} == {0o600}


def test_a_sink_file_never_shows_its_content_in_a_repr_and_refuses_reserved_names() -> None:
    secret = SinkFile("key.pem", b"-----BEGIN PRIVATE KEY-----", 0o600, secret=True)
    assert "PRIVATE" not in repr(secret) and "PRIVATE" not in repr(
        Material(b"-----BEGIN PRIVATE KEY-----", b"", TD, b"")
    )
    for name in ("..data", "..x", "a/b", "", "."):
        with pytest.raises(InvalidValue, match="not a sink file name") as refused:
            SinkFile(name, b"", 0o644)
        assert refused.value.reason == "sink_file_name"


async def test_cli_creds_out_writes_each_layout_exactly_as_a_sink_of_that_layout(
    shared_dir: Path, tmp_path: Path, files: FileSet, ca: CertificateAuthority
) -> None:
    """`wlidd creds --out DIR --layout L` (default spiffe-helper) and a sink with layout L hold the same
    files, published the same way (..data and links)."""
    files.put(ca.issue_svid(), ca.bundle_pem)
    sinks = [{"dir": str(tmp_path / "sink" / layout), "layout": layout} for layout in NAMES]
    d = Daemon(
        Config.model_validate(
            {
                "identities": {"default": files.config(sinks=sinks)},
                "listeners": {"unix": {"path": str(shared_dir / "wlidd.sock")}},
                "policy": {"credentials": {"users": [os.getuid()]}},
            }
        )
    )
    async with in_background(d.run, d.stop):
        for layout in NAMES:
            args = ["--layout", layout] if layout != "spiffe-helper" else []  # the default
            out = tmp_path / "cli" / layout
            command = [sys.executable, "-m", "wlidd", "creds", "default", "--out", str(out), *args]
            result = await anyio.run_process([*command, "--socket", str(d.socket_path)], check=False)
            assert result.returncode == 0, result.stderr.decode()
            assert SPIFFE_ID.encode() in result.stdout
    for layout in NAMES:
        cli, daemon_sink = tmp_path / "cli" / layout, tmp_path / "sink" / layout
        assert stable_names(cli) == stable_names(daemon_sink)
        for name in stable_names(cli):
            assert os.readlink(cli / name) == f"..data/{name}"
            if name != "certificate_config.json":  # it names its own directory's paths
                assert (cli / name).read_bytes() == (daemon_sink / name).read_bytes(), name
            assert os.stat(cli / name).st_mode == os.stat(daemon_sink / name).st_mode
