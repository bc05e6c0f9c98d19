"""Real rotations on real files: the watcher picks up every writer's pattern and keeps the last good set."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.streams.tls import TLSListener, TLSStream
from cryptography import x509

from tests.conftest import TD, FileSet, wait_until
from wlidd.config import IdentityConfig, parse_identity_config
from wlidd.emulator.ca import CertificateAuthority, cert_pem, spiffe_bundle
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files
from wlidd.errors import SvidError
from wlidd.svid.credential_set import CredentialFiles, build_identity
from wlidd.svid.load.retry import load_identity
from wlidd.svid.load.source import CredentialSource
from wlidd.tlsctx import HotServerContext, TlsContexts
from wlidd.watch import CredentialWatcher, IdentityState


async def changed(watcher: CredentialWatcher, after_version: int, timeout: float = 10.0) -> IdentityState:
    with anyio.fail_after(timeout):
        return await watcher.wait_for_change(after_version)


@asynccontextmanager
async def running(watcher: CredentialWatcher) -> AsyncIterator[CredentialWatcher]:
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        yield watcher
        watcher.close()
        tg.cancel_scope.cancel()


def serial_of(svid_leaf: x509.Certificate) -> str:
    return format(svid_leaf.serial_number, "x")


def gce_config(writer: GceCredentialWriter, **overrides: object) -> IdentityConfig:
    values: dict[str, object] = {
        "source": "gce",
        "dir": writer.link,
        "mismatch_retries": 4,
        "mismatch_retry_delay": 0.2,
        "debounce": 0.02,
    }
    values.update(overrides)
    return parse_identity_config(values)


async def test_atomic_rename_of_new_files_is_picked_up(files: FileSet, ca: CertificateAuthority) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    async with running(CredentialWatcher("default", files.source(mismatch_retries=4, mismatch_retry_delay=0.2))) as w:
        assert w.current is not None and w.current.version == 1
        new = ca.issue_svid("/ns/default/sa/new")
        files.put(new)
        state = await changed(w, 1)
        assert state.identity.svid.serial == serial_of(new.leaf)
        assert str(state.identity.svid.spiffe_id) == f"spiffe://{TD}/ns/default/sa/new"


@pytest.mark.parametrize("atomic", [False, True], ids=["current-writer-unlink-window", "older-writer-atomic"])
async def test_gce_symlink_swap_is_picked_up_and_old_dir_may_vanish(
    tmp_path: Path, ca: CertificateAuthority, atomic: bool
) -> None:
    writer = GceCredentialWriter(tmp_path / "secrets", atomic=atomic)
    first = ca.issue_svid()
    writer.rotate(gce_files(first.chain_pem, first.key_pem, ca_pem=ca.bundle_pem))
    async with running(CredentialWatcher("default", CredentialSource("default", gce_config(writer)))) as w:
        assert w.current is not None
        assert w.current.identity.svid.serial == serial_of(first.leaf)
        for _ in range(3):
            new = ca.issue_svid()
            version = w.current.version
            writer.rotate(gce_files(new.chain_pem, new.key_pem, ca_pem=ca.bundle_pem))
            state = await changed(w, version)
            assert state.identity.svid.serial == serial_of(new.leaf)
        assert w.stats.rejections == 0
        assert len(list((tmp_path / "secrets").glob("workload-spiffe-contents-*"))) == 1


async def test_gce_unlink_window_is_retried_not_rejected(tmp_path: Path, ca: CertificateAuthority) -> None:
    writer = GceCredentialWriter(tmp_path / "secrets")
    first = ca.issue_svid()
    writer.rotate(gce_files(first.chain_pem, first.key_pem, ca_pem=ca.bundle_pem))
    watcher = CredentialWatcher("default", CredentialSource("default", gce_config(writer)))
    assert await watcher.reload("start")
    new = ca.issue_svid()
    new_dir = writer.new_contents_dir()
    writer.write_files(new_dir, gce_files(new.chain_pem, new.key_pem, ca_pem=ca.bundle_pem))
    os.unlink(writer.link)  # the agent's window: no live link at all

    async def finish_swap() -> None:
        await anyio.sleep(0.1)
        os.symlink(new_dir, writer.link)

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish_swap)
        assert await watcher.reload("event") is True
    assert watcher.current is not None and watcher.current.identity.svid.serial == serial_of(new.leaf)
    assert watcher.stats.rejections == 0


async def test_gce_first_provisioning_link_before_files_is_loaded_once_written(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    writer = GceCredentialWriter(tmp_path / "secrets")
    svid = ca.issue_svid()
    new_dir = writer.new_contents_dir()
    writer.swap_to(new_dir)  # the link exists, the files do not yet
    watcher = CredentialWatcher("default", CredentialSource("default", gce_config(writer)))

    async def provision() -> None:
        await anyio.sleep(0.15)
        writer.write_files(new_dir, gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))

    async with anyio.create_task_group() as tg:
        tg.start_soon(provision)
        await tg.start(watcher.run)
        await wait_until(lambda: watcher.current is not None)
        watcher.close()
        tg.cancel_scope.cancel()
    assert watcher.current is not None
    assert watcher.current.identity.svid.serial == serial_of(svid.leaf)


async def test_gce_swap_with_unchanged_content_publishes_nothing(tmp_path: Path, ca: CertificateAuthority) -> None:
    writer = GceCredentialWriter(tmp_path / "secrets")
    svid = ca.issue_svid()
    files = gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem)
    writer.rotate(files)
    watcher = CredentialWatcher("default", CredentialSource("default", gce_config(writer)))
    assert await watcher.reload("start")
    writer.rotate(files)  # the agent swaps every 10 minutes even when nothing changed
    assert await watcher.reload("file-event") is False
    assert watcher.current is not None and watcher.current.version == 1
    assert watcher.stats.reloads == 2 and watcher.stats.rejections == 0


async def test_gce_trust_bundles_json_with_several_trust_domains(
    tmp_path: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    writer = GceCredentialWriter(tmp_path / "secrets")
    svid = ca.issue_svid()
    bundles = {TD: spiffe_bundle(ca.root), "other.org": spiffe_bundle(foreign_ca.root)}
    for wrapped in (bundles, {"trust_domains": bundles}):
        writer.rotate(gce_files(svid.chain_pem, svid.key_pem, trust_bundles_json=json.dumps(wrapped).encode()))
        identity = await load_identity(CredentialSource("default", gce_config(writer)))
        assert identity.bundles.trust_domains == ("example.org", "other.org")
        assert identity.own_bundle.authorities == (ca.root,)


async def test_gce_leaf_signed_by_another_domains_ca_is_rejected_with_trust_bundles_json(
    tmp_path: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    writer = GceCredentialWriter(tmp_path / "secrets")
    forged = foreign_ca.issue_svid(spiffe_id=f"spiffe://{TD}/ns/default/sa/admin")
    bundles = {TD: spiffe_bundle(ca.root), "other.org": spiffe_bundle(foreign_ca.root)}
    writer.rotate(gce_files(forged.chain_pem, forged.key_pem, trust_bundles_json=json.dumps(bundles).encode()))
    with pytest.raises(SvidError) as info:
        await load_identity(CredentialSource("default", gce_config(writer)))
    assert info.value.reason == "chain_other_trust_domain"


async def test_kubernetes_data_symlink_swap_is_picked_up(tmp_path: Path, ca: CertificateAuthority) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(svid_chain: bytes, key: bytes, stamp: str) -> None:
        ts_dir = mount / f"..{stamp}"
        ts_dir.mkdir()
        (ts_dir / "tls.crt").write_bytes(svid_chain)
        (ts_dir / "tls.key").write_bytes(key)
        (ts_dir / "ca.crt").write_bytes(ca.bundle_pem)
        old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
        os.symlink(ts_dir.name, mount / "..data_tmp")
        os.rename(mount / "..data_tmp", mount / "..data")
        for name in ("tls.crt", "tls.key", "ca.crt"):
            if not (mount / name).is_symlink():
                os.symlink(f"..data/{name}", mount / name)
        if old:
            shutil.rmtree(mount / old)

    first = ca.issue_svid()
    publish(first.chain_pem, first.key_pem, "2026_01_01_00_00_00.1")
    config = parse_identity_config(
        {
            "source": "files",
            "cert": mount / "tls.crt",
            "key": mount / "tls.key",
            "bundle": mount / "ca.crt",
            "debounce": 0.02,
        }
    )
    async with running(CredentialWatcher("default", CredentialSource("default", config))) as w:
        assert w.current is not None and w.current.identity.svid.serial == serial_of(first.leaf)
        second = ca.issue_svid()
        publish(second.chain_pem, second.key_pem, "2026_01_01_00_10_00.2")
        state = await changed(w, 1)
        assert state.identity.svid.serial == serial_of(second.leaf)


async def test_torn_in_place_write_is_rejected_then_accepted_when_complete(
    files: FileSet, ca: CertificateAuthority
) -> None:
    first = ca.issue_svid()
    files.put(first, ca.bundle_pem)
    async with running(CredentialWatcher("default", files.source())) as w:
        second = ca.issue_svid(key=first.key)  # same key: only the chain file changes
        data = second.chain_pem
        with open(files.cert, "wb") as handle:  # truncate and write in place, in two halves
            handle.write(data[: len(data) // 2])
            handle.flush()
            await wait_until(lambda: w.stats.rejections >= 1)
            assert w.stats.last_error_reason == "chain_bad_pem"
            assert w.current is not None and w.current.identity.svid.serial == serial_of(first.leaf)
            handle.write(data[len(data) // 2 :])
        state = await changed(w, 1)
        assert state.identity.svid.serial == serial_of(second.leaf)


async def test_key_mismatch_that_resolves_within_the_retries_is_accepted(
    files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    watcher = CredentialWatcher("default", files.source(mismatch_retries=4, mismatch_retry_delay=0.1))
    assert await watcher.reload("start")
    new = ca.issue_svid()
    files.write("chain.pem", new.chain_pem)  # the key follows a moment later

    async def write_key() -> None:
        await anyio.sleep(0.05)
        files.write("key.pem", new.key_pem)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write_key)
        assert await watcher.reload("event") is True
    assert watcher.current is not None and watcher.current.identity.svid.serial == serial_of(new.leaf)
    assert watcher.stats.rejections == 0


async def test_key_mismatch_that_stays_the_same_across_a_full_delay_is_rejected_after_one_retry(
    files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    files.write("key.pem", ca.issue_svid().key_pem)
    sleeps: list[float] = []
    retries: list[int] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    with pytest.raises(SvidError) as info:
        await load_identity(
            files.source(mismatch_retries=4, mismatch_retry_delay=5.0),
            sleep=fake_sleep,
            on_retry=lambda attempt, exc: retries.append(attempt),
        )
    assert info.value.reason == "key_mismatch"
    assert sleeps == [5.0]  # the same files failed the same way 5 s apart: that is what the writer meant
    assert retries == [1]


async def test_a_set_that_keeps_changing_is_retried_up_to_mismatch_retries_then_rejected(
    files: FileSet, ca: CertificateAuthority
) -> None:
    files.put(ca.issue_svid(), ca.bundle_pem)
    sleeps: list[float] = []

    async def writer_still_busy(seconds: float) -> None:
        sleeps.append(seconds)
        files.write("key.pem", ca.issue_svid().key_pem)  # another key each time: never the leaf's

    files.write("key.pem", ca.issue_svid().key_pem)
    with pytest.raises(SvidError) as info:
        await load_identity(files.source(mismatch_retries=4, mismatch_retry_delay=5.0), sleep=writer_still_busy)
    assert info.value.reason == "key_mismatch"
    assert sleeps == [5.0, 5.0, 5.0]  # 4 attempts, 5 s apart


async def test_retries_woken_by_unrelated_file_events_do_not_use_up_the_retry_window(
    files: FileSet, ca: CertificateAuthority
) -> None:
    from wlidd.svid.load.retry import MAX_READS_PER_ATTEMPT

    files.put(ca.issue_svid(), ca.bundle_pem)
    files.write("key.pem", ca.issue_svid().key_pem)
    sleeps: list[float] = []

    async def woken_early(seconds: float) -> bool:
        sleeps.append(seconds)
        if len(sleeps) == 10:  # the writer finishes after many unrelated events in the directory
            files.write("key.pem", good.key_pem)
        return True  # an event cut the wait short at once: no time passed

    good = ca.issue_svid()
    files.put(good)
    files.write("key.pem", ca.issue_svid().key_pem)
    identity = await load_identity(files.source(mismatch_retries=3, mismatch_retry_delay=5.0), sleep=woken_early)
    assert identity.svid.serial == serial_of(good.leaf) and len(sleeps) == 10
    sleeps.clear()
    files.write("key.pem", ca.issue_svid().key_pem)

    async def events_forever(seconds: float) -> bool:
        sleeps.append(seconds)
        return True

    with pytest.raises(SvidError):  # the read cap ends it
        await load_identity(files.source(mismatch_retries=3, mismatch_retry_delay=5.0), sleep=events_forever)
    assert len(sleeps) == 3 * MAX_READS_PER_ATTEMPT - 1


async def test_trust_bundle_rotation_adds_then_removes_a_root(files: FileSet, ca: CertificateAuthority) -> None:
    new_ca = CertificateAuthority(TD)
    old_svid = ca.issue_svid()
    files.put(old_svid, ca.bundle_pem)
    watcher = CredentialWatcher("default", files.source())
    assert await watcher.reload("start")
    # 1. the new root is added beside the old one: same SVID, new bundle, new state
    files.write("bundle.pem", cert_pem(ca.root, new_ca.root))
    assert await watcher.reload("event") is True
    assert watcher.current is not None
    assert len(watcher.current.identity.own_bundle.authorities) == 2
    # 2. SVIDs from the new CA are issued
    new_svid = new_ca.issue_svid()
    files.put(new_svid)
    assert await watcher.reload("event") is True
    # 3. the old root is removed; an SVID of the old CA no longer verifies
    files.write("bundle.pem", new_ca.bundle_pem)
    assert await watcher.reload("event") is True
    assert watcher.current.identity.own_bundle.authorities == (new_ca.root,)
    files.put(old_svid)
    assert await watcher.reload("event") is False
    assert watcher.stats.last_error_reason == "chain_untrusted"
    assert watcher.current.identity.svid.serial == serial_of(new_svid.leaf)


def _client_context(ca: CertificateAuthority, path: str = "/ns/client/sa/c") -> ssl.SSLContext:
    svid = ca.issue_svid(path)
    files = CredentialFiles("test", svid.chain_pem, svid.key_pem, own_bundle=ca.bundle_pem)
    return TlsContexts.build(build_identity(files, dt.datetime.now(dt.UTC))).client


async def _handshake_serial(port: int, context: ssl.SSLContext) -> tuple[str, TLSStream]:
    tcp = await anyio.connect_tcp("127.0.0.1", port)
    try:
        stream = await TLSStream.wrap(tcp, server_side=False, ssl_context=context, standard_compatible=False)
    except BaseException:
        await tcp.aclose()
        raise
    der = stream.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary)
    assert stream.extra(anyio.streams.tls.TLSAttribute.tls_version) == "TLSv1.3"
    return serial_of(x509.load_der_x509_certificate(der)), stream


async def test_mtls_handshake_presents_new_leaf_after_rotation(tmp_path: Path, ca: CertificateAuthority) -> None:
    writer = GceCredentialWriter(tmp_path / "secrets")
    first = ca.issue_svid("/ns/server/sa/s")
    writer.rotate(gce_files(first.chain_pem, first.key_pem, ca_pem=ca.bundle_pem))
    watcher = CredentialWatcher("default", CredentialSource("default", gce_config(writer)))
    hot = HotServerContext(watcher.current_tls)
    client_context = _client_context(ca)

    async def echo(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            try:
                async for chunk in stream:
                    await stream.send(chunk)
            except (anyio.BrokenResourceError, ssl.SSLError):
                pass

    async with running(watcher):
        tcp_listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = tcp_listener.extra(anyio.abc.SocketAttribute.local_port)
        listener = TLSListener(tcp_listener, hot.context, standard_compatible=False)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            serial, old_stream = await _handshake_serial(port, client_context)
            assert serial == serial_of(first.leaf)

            second = ca.issue_svid("/ns/server/sa/s")
            writer.rotate(gce_files(second.chain_pem, second.key_pem, ca_pem=ca.bundle_pem))
            await changed(watcher, 1)
            serial, new_stream = await _handshake_serial(port, client_context)
            assert serial == serial_of(second.leaf)
            # the established connection keeps working on its old session
            await old_stream.send(b"ping")
            assert await old_stream.receive() == b"ping"
            await old_stream.aclose()
            await new_stream.aclose()
            # a client certificate from another root of the same trust domain is refused
            with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)):
                _, bad = await _handshake_serial(port, _client_context(CertificateAuthority(TD)))
                async with bad:
                    await bad.send(b"x")
                    await bad.receive()
            tg.cancel_scope.cancel()


async def test_timer_schedules_periodic_pre_expiry_and_expiry_rereads(files: FileSet, ca: CertificateAuthority) -> None:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ca = CertificateAuthority(TD, now=base)
    svid = ca.issue_svid(now=base, ttl=dt.timedelta(minutes=20))
    files.put(svid, ca.bundle_pem)
    clock_now = [base]
    watcher = CredentialWatcher("default", files.source(reload_interval="10m"), clock=lambda: clock_now[0])
    await watcher.reload("start")
    assert watcher.next_timer_deadline(base) == (base + dt.timedelta(minutes=10), "timer")
    later = base + dt.timedelta(minutes=15)
    watcher.stats.last_checked = later
    assert watcher.next_timer_deadline(later) == (
        svid.leaf.not_valid_after_utc - dt.timedelta(seconds=30),
        "pre-expiry",
    )
    at_margin = svid.leaf.not_valid_after_utc - dt.timedelta(seconds=10)
    watcher.stats.last_checked = at_margin
    assert watcher.next_timer_deadline(at_margin) == (svid.leaf.not_valid_after_utc, "expiry")


async def test_certificate_config_workload_entry_is_followed(tmp_path: Path, ca: CertificateAuthority) -> None:
    creds = FileSet(tmp_path / "workload")
    svid = ca.issue_svid()
    creds.put(svid, ca.bundle_pem)
    config_file = tmp_path / "certificate_config.json"
    config_file.write_text(
        json.dumps(
            {"version": 1, "cert_configs": {"workload": {"cert_path": str(creds.cert), "key_path": str(creds.key)}}}
        )
    )
    config = parse_identity_config({"source": "certificate_config", "bundle": creds.bundle})
    source = CredentialSource("default", config, {"GOOGLE_API_CERTIFICATE_CONFIG": str(config_file)})
    identity = await load_identity(source)
    assert identity.svid.serial == serial_of(svid.leaf)
    assert creds.dir in source.watch_dirs() and tmp_path in source.watch_dirs()


def test_link_parents_follow_every_symlink_on_the_way(tmp_path: Path) -> None:
    from wlidd.svid.load.files import link_parents

    store = tmp_path / "store"
    (store / "v1").mkdir(parents=True)
    (store / "v1" / "tls.crt").write_text("x")
    os.symlink("v1", store / "current")  # a swapped "current" directory link
    certs = tmp_path / "certs"
    certs.mkdir()
    os.symlink(store / "current" / "tls.crt", certs / "tls.crt")
    assert link_parents(certs / "tls.crt") == [certs, store, store / "v1"]  # real paths, each once


async def test_symlinked_directory_swap_elsewhere_is_picked_up(tmp_path: Path, ca: CertificateAuthority) -> None:
    store = tmp_path / "store"
    certs = tmp_path / "certs"
    certs.mkdir()

    def publish(version: str, svid_chain: bytes, key: bytes) -> None:
        target = store / version
        target.mkdir(parents=True)
        (target / "tls.crt").write_bytes(svid_chain)
        (target / "tls.key").write_bytes(key)
        os.symlink(version, store / "current.tmp")
        os.rename(store / "current.tmp", store / "current")

    first = ca.issue_svid()
    publish("v1", first.chain_pem, first.key_pem)
    for name in ("tls.crt", "tls.key"):
        os.symlink(store / "current" / name, certs / name)
    (certs / "ca.crt").write_bytes(ca.bundle_pem)
    config = parse_identity_config(
        {
            "source": "files",
            "cert": certs / "tls.crt",
            "key": certs / "tls.key",
            "bundle": certs / "ca.crt",
            "debounce": 0.02,
        }
    )
    async with running(CredentialWatcher("default", CredentialSource("default", config))) as w:
        second = ca.issue_svid()
        publish("v2", second.chain_pem, second.key_pem)  # only /store changes; /certs sees no event
        state = await changed(w, 1)
        assert state.identity.svid.serial == serial_of(second.leaf)


async def test_directory_that_appears_later_is_watched_and_read(tmp_path: Path, ca: CertificateAuthority) -> None:
    secrets = tmp_path / "secrets"  # does not exist yet: the guest agent has not run
    config = parse_identity_config(
        {"source": "gce", "dir": secrets / "workload-spiffe-credentials", "mismatch_retries": 1, "debounce": 0.02}
    )
    watcher = CredentialWatcher("default", CredentialSource("default", config))
    async with running(watcher) as w:
        assert w.current is None and w.stats.last_error_reason == "file_missing"
        writer = GceCredentialWriter(secrets)
        svid = ca.issue_svid()
        writer.rotate(gce_files(svid.chain_pem, svid.key_pem, ca_pem=ca.bundle_pem))
        state = await changed(w, 0)
        assert state.identity.svid.serial == serial_of(svid.leaf)


def test_reread_interval_is_short_while_nothing_valid_is_loaded(files: FileSet) -> None:
    watcher = CredentialWatcher("default", files.source(reload_interval="10m"))
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    watcher.stats.last_checked = now
    assert watcher.next_timer_deadline(now) == (now + dt.timedelta(seconds=30), "timer")


async def test_credentials_in_a_subdirectory_of_another_watched_directory_are_watched(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    creds = FileSet(tmp_path / "creds")  # the chain and key here …
    bundle = tmp_path / "bundle.pem"  # … and the bundle in the parent: both directories need watching
    bundle.write_bytes(ca.bundle_pem)
    creds.put(ca.issue_svid())
    config = parse_identity_config(
        {"source": "files", "cert": creds.cert, "key": creds.key, "bundle": bundle, "debounce": 0.02}
    )
    source = CredentialSource("default", config)
    assert creds.dir in source.watch_dirs() and tmp_path in source.watch_dirs()
    async with running(CredentialWatcher("default", source)) as w:
        new = ca.issue_svid()
        creds.put(new)
        state = await changed(w, 1)
        assert state.identity.svid.serial == serial_of(new.leaf)


async def test_a_rotation_read_while_descriptors_are_exhausted_is_retried_not_rejected(
    files: FileSet, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE while reading or building the new TLS contexts (a local connection flood) is the process's
    state, not the files': no rejection is counted, the last good set stays, and the reload is tried
    again shortly — the rotation is picked up without waiting for the next periodic re-read."""
    import errno

    from wlidd import watch

    files.put(ca.issue_svid(), ca.bundle_pem)
    monkeypatch.setattr(watch, "RESOURCE_RETRY", 0.05)
    real_build = TlsContexts.build
    failures = {"left": 2}

    def build(identity: object) -> TlsContexts:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_build(identity)  # type: ignore[arg-type]

    watcher = CredentialWatcher("default", files.source(reload_interval=3600))
    async with running(watcher):
        first = watcher.current
        assert first is not None
        monkeypatch.setattr(watch.TlsContexts, "build", staticmethod(build))
        new = ca.issue_svid()
        files.put(new)
        state = await changed(watcher, first.version)
    assert state.identity.svid.serial == serial_of(new.leaf)
    assert watcher.stats.rejections == 0 and failures["left"] == 0
