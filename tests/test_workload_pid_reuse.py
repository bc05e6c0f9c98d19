"""A caller that connects, exits, and whose pid is given to another process before wlidd decides never lends
that process's rights: the attack the pidfd closes (wlidd.workload.proc).

Real processes in a fresh pid namespace (`unshare --pid --fork --mount-proc`, as root), where the test sets
/proc/sys/kernel/ns_last_pid so that the allowed program is started on the very pid the attacker connected
from, after the attacker exited and before the decision. Both ways to a pidfd are tried: SO_PEERPIDFD, and
pidfd_open (an older kernel's) with the start time recorded at accept and without it. The naive reading
(/proc/<pid>/exe when deciding) is shown to name the allowed program, so the test would pass a wrong
implementation only if the reuse did not happen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT_DIR = Path(__file__).resolve().parents[1]
REAL_PYTHON = os.path.realpath(sys.executable)

SCENARIO = """
import json, os, socket, subprocess, sys
import anyio
from wlidd.api.callers import CallerCache
from wlidd.api.peers import socket_peer
from wlidd.config import AccessRule, PolicyConfig
from wlidd.policy import Policy
from wlidd.workload.proc import PROCESSES, ProcessIdentifier

app, attacker_exe, directory = sys.argv[1:4]
policy = Policy.from_config(PolicyConfig(credentials=AccessRule(executables=(app,))), log_unknown=False)
CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); sys.stdin.read()"


def start_on(pid, command):
    # the next process forked gets ns_last_pid + 1 (this namespace is the test's alone: nothing else forks)
    with open("/proc/sys/kernel/ns_last_pid", "w") as last:
        last.write(str(pid - 1))
    return subprocess.Popen(command, stdin=subprocess.PIPE)


async def scenario(mode):
    path = os.path.join(directory, str(len(mode)) + ".sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    # an older kernel's path (pidfd_open), with and without the start time recorded at accept
    PROCESSES.peer_pidfd = None if mode == "SO_PEERPIDFD" else False
    PROCESSES.wanted = mode != "pidfd_open, nothing recorded at accept"
    attacker = subprocess.Popen([attacker_exe, "-c", CONNECT, path], stdin=subprocess.PIPE)
    conn, _ = server.accept()
    peer = socket_peer(conn)  # what wlidd records at accept
    attacker.communicate(b"")  # the attacker exits and is reaped
    for _ in range(20):  # bounded: another fork could take the pid first (none does here)
        legit = start_on(attacker.pid, [app, "-c", "import sys; sys.stdin.read()"])
        if legit.pid == attacker.pid:
            break
        legit.communicate(b"")
    naive = os.readlink(f"/proc/{attacker.pid}/exe")
    identifier = ProcessIdentifier(peer_pidfd=None if mode == "SO_PEERPIDFD" else False)
    caller = await CallerCache(processes=identifier).caller_of(peer, policy)
    decision = policy.may_have_credentials(caller, "default")
    legit.communicate(b"")
    conn.close()
    return {"reused": legit.pid == attacker.pid, "naive_exe": naive, "refusal": decision.refusal,
            "problem": caller.process_problem, "peer_pidfd": identifier.peer_pidfd}


async def main():
    modes = ("SO_PEERPIDFD", "pidfd_open", "pidfd_open, nothing recorded at accept")
    print(json.dumps({mode: await scenario(mode) for mode in modes}))

anyio.run(main)
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """The allowed program: a copy of this interpreter at its own path."""
    path = tmp_path / "app"
    shutil.copy2(REAL_PYTHON, path)
    return path


def test_a_reused_pid_never_lends_the_new_process_its_rights(tmp_path: Path, app: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a pid namespace and choose pids in it")
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", SCENARIO]
    result = subprocess.run(
        [*command, str(app), REAL_PYTHON, str(tmp_path)], cwd=ROOT_DIR, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0 and "unshare failed" in result.stderr:
        pytest.skip(f"this host does not let the test make a pid namespace: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    for mode, seen in outcome.items():
        assert seen["reused"], f"{mode}: the allowed program did not get the attacker's pid"
        assert seen["naive_exe"] == str(app), f"{mode}: /proc/<pid>/exe does not name the allowed program"
        assert seen["refusal"] is not None, f"{mode}: the reused pid lent its rights"
    assert outcome["SO_PEERPIDFD"]["problem"] == "the caller exited during identification"
    pidfd_open = outcome["pidfd_open"]
    assert pidfd_open["peer_pidfd"] is False
    assert pidfd_open["problem"].endswith("is now another process than the one that connected (the caller exited)")
    unrecorded = outcome["pidfd_open, nothing recorded at accept"]["problem"]
    assert unrecorded.endswith(
        "is a process started no earlier than the connection: it cannot be told from a process that took a pid the caller left (retry)"
    )
