"""Issue 14, sources: sets caught mid-write are retried quietly, a mixed generation is never a refusal,
a federated domain's broken bundle does not freeze the own SVID, and `last_error` tells the present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest

from tests.conftest import TD, FileSet
from tests.test_watch import changed, running, serial_of
from wlidd.config import parse_identity_config
from wlidd.emulator.ca import CertificateAuthority, spiffe_bundle
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files
from wlidd.errors import RetryableSvidError
from wlidd.metrics import Metrics
from wlidd.status_report import identity_status
from wlidd.svid.load import source as load_source
from wlidd.svid.load.retry import load_identity
from wlidd.svid.load.source import CredentialSource
from wlidd.watch import CredentialWatcher


def federated_config(files: FileSet, other: Path, **overrides: object) -> CredentialSource:
    return files.source(bundles={"other.org": other}, **overrides)


async def test_an_in_place_rewrite_caught_half_written_is_retried_quietly(
    files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    metrics = Metrics()
    source = files.source(mismatch_retries=8, mismatch_retry_delay=0.3)
    async with running(CredentialWatcher("default", source, metrics=metrics)) as w:
        for version in range(1, 4):
            new = ca.issue_svid()
            # cron + cp: truncate and rewrite each file in place, in two chunks with a pause
            for path, data in ((files.cert, new.chain_pem), (files.key, new.key_pem)):
                with path.open("r+b") as handle:
                    handle.truncate(0)
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    await anyio.sleep(0.1)
                    handle.write(data[len(data) // 2 :])
            state = await changed(w, version)
            assert state.identity.svid.serial == serial_of(new.leaf)
        assert w.stats.rejections == 0 and w.stats.last_error is None and w.stats.last_rejection is None
        assert b"wlidd_identity_rejections_total{" not in generate_latest(metrics.registry)


async def test_a_mixed_generation_read_across_a_data_link_swap_is_read_again_not_refused(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kubernetes layout: name -> ..data/name, ..data -> ..gen; generation 2 comes from a new CA,
    # so chain 1 with bundle 2 would be chain_untrusted.
    root = tmp_path / "creds"
    root.mkdir()

    def generation(name: str, svid_chain: bytes, key: bytes, bundle: bytes) -> None:
        (root / name).mkdir()
        for file, data in (("tls.crt", svid_chain), ("tls.key", key), ("ca.crt", bundle)):
            (root / name / file).write_bytes(data)
        os.symlink(name, root / "..data_tmp")
        os.rename(root / "..data_tmp", root / "..data")

    first, second = ca.issue_svid(), other_ca.issue_svid()
    generation("..gen1", first.chain_pem, first.key_pem, ca.bundle_pem)
    for file in ("tls.crt", "tls.key", "ca.crt"):
        os.symlink(f"..data/{file}", root / file)
    source = CredentialSource(
        "default",
        parse_identity_config(
            {"source": "files", "cert": root / "tls.crt", "key": root / "tls.key", "bundle": root / "ca.crt"}
        ),
    )
    real_read = load_source.read_file
    swapped: list[str] = []

    def read_then_swap(path: Path, what: str) -> bytes:
        data = real_read(path, what)
        if what == "chain" and not swapped:
            swapped.append("yes")  # the writer swaps ..data right after wlidd read the chain
            generation("..gen2", second.chain_pem, second.key_pem, other_ca.bundle_pem)
        return data

    monkeypatch.setattr(load_source, "read_file", read_then_swap)
    with pytest.raises(RetryableSvidError) as info:
        source.read()
    assert info.value.reason == "set_changed_while_read"
    identity = await load_identity(source, sleep=lambda _: anyio.sleep(0), attempts=2)
    assert identity.svid.serial == serial_of(second.leaf)


async def test_a_broken_federated_bundle_keeps_its_last_good_copy_and_the_own_svid_rotates(
    files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    other = files.dir / "other.pem"
    other.write_bytes(foreign_ca.bundle_pem)
    files.put(ca.issue_svid(), ca.bundle_pem)
    metrics = Metrics()
    watcher = CredentialWatcher("default", federated_config(files, other, mismatch_retries=2), metrics=metrics)
    assert await watcher.reload("start")
    for damage in ("truncate", "delete"):
        if damage == "truncate":
            other.write_bytes(foreign_ca.bundle_pem[:100])
        else:
            other.unlink()
        new = ca.issue_svid()
        files.put(new)
        assert await watcher.reload("event") is True
        state = watcher.current
        assert state is not None and state.identity.svid.serial == serial_of(new.leaf)
        kept = state.identity.bundles.get("other.org")
        assert kept is not None and kept.authorities == (foreign_ca.root,)
        (problem,) = state.identity.bundle_problems
        assert problem.trust_domain == "other.org" and problem.kept
        assert problem.reason == ("bundle_bad_pem" if damage == "truncate" else "file_missing")
        status = identity_status(watcher, watcher.clock())
        assert status.bundle_problems[0].trust_domain == "other.org" and status.last_error is None
        assert b'wlidd_trust_bundle_problem{identity="default",trust_domain="other.org"} 1.0' in generate_latest(
            metrics.registry
        )
        assert watcher.stats.rejections == 0
    other.write_bytes(foreign_ca.bundle_pem)
    assert await watcher.reload("event") is True
    assert watcher.current is not None and watcher.current.identity.bundle_problems == ()
    assert b"wlidd_trust_bundle_problem{" not in generate_latest(metrics.registry)


async def test_one_bad_entry_in_trust_bundles_json_refuses_only_its_domain(
    tmp_path: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    writer = GceCredentialWriter(tmp_path / "secrets")

    def bundles(other: object) -> bytes:
        return json.dumps({TD: spiffe_bundle(ca.root), "other.org": other}).encode()

    first = ca.issue_svid()
    writer.rotate(gce_files(first.chain_pem, first.key_pem, trust_bundles_json=bundles(spiffe_bundle(foreign_ca.root))))
    config = parse_identity_config({"source": "gce", "dir": writer.link, "mismatch_retries": 1})
    watcher = CredentialWatcher("default", CredentialSource("default", config))
    assert await watcher.reload("start")
    second = ca.issue_svid()
    writer.rotate(gce_files(second.chain_pem, second.key_pem, trust_bundles_json=bundles({"keys": "damaged"})))
    assert await watcher.reload("event") is True
    state = watcher.current
    assert state is not None and state.identity.svid.serial == serial_of(second.leaf)
    assert state.identity.bundles.get("other.org") is not None
    assert [p.trust_domain for p in state.identity.bundle_problems] == ["other.org"]


async def test_a_federated_problem_caught_mid_write_is_retried_before_it_is_reported(
    files: FileSet, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    other = files.dir / "other.pem"
    other.write_bytes(foreign_ca.bundle_pem)
    files.put(ca.issue_svid(), ca.bundle_pem)
    source = federated_config(files, other, mismatch_retries=4, mismatch_retry_delay=5.0)
    served = await load_identity(source)
    other.write_bytes(foreign_ca.bundle_pem[:50])
    sleeps: list[float] = []

    async def writer_finishes(seconds: float) -> None:
        sleeps.append(seconds)
        other.write_bytes(foreign_ca.bundle_pem)

    identity = await load_identity(source, sleep=writer_finishes, current=served)
    assert sleeps == [5.0] and identity.bundle_problems == ()


async def test_an_own_domain_bundle_that_is_broken_still_refuses_the_set(
    files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem[:80])
    watcher = CredentialWatcher("default", files.source(mismatch_retries=1))
    assert await watcher.reload("start") is False
    assert watcher.stats.last_error_reason == "bundle_bad_pem"


async def test_last_error_describes_the_present_and_last_rejection_keeps_the_history(
    files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    watcher = CredentialWatcher("default", files.source(mismatch_retries=1))
    assert await watcher.reload("start")
    files.write("chain.pem", b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    assert await watcher.reload("event") is False
    status = identity_status(watcher, watcher.clock())
    assert status.last_error is not None and status.last_error.reason == "chain_bad_pem" and status.valid is True
    good = ca.issue_svid()
    files.put(good)
    assert await watcher.reload("event") is True
    status = identity_status(watcher, watcher.clock())
    assert status.last_error is None and status.valid is True
    assert status.last_rejection is not None and status.last_rejection.reason == "chain_bad_pem"
    assert status.last_rejection.at is not None
    # a refusal followed by the old good files again (nothing new to load) clears it too
    files.write("key.pem", b"garbage")
    assert await watcher.reload("event") is False
    files.write("key.pem", good.key_pem)
    assert await watcher.reload("event") is False
    assert identity_status(watcher, watcher.clock()).last_error is None
