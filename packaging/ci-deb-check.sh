#!/usr/bin/env bash
# CI check of the Debian package, on this machine, as root: `make deb`; `dpkg -i` it; the installed
# wlidd runs (/opt/wlidd/bin/wlidd --version) and `wlidd check` reads /etc/wlidd/wlidd.toml as the
# wlidd user; `systemd-analyze verify` on the installed units; an upgrade (the same files under a
# higher version: the maintainer scripts run again, a changed conffile is kept); `dpkg --purge`;
# nothing of the package is left (the wlidd user and the wlidd-clients group stay, on purpose:
# debian/wlidd.postrm says why).
#
# Idempotent: a wlidd package left installed by an earlier, failed run is purged first; whatever
# happens, the package is purged and the scratch directory removed on exit. Installs what it needs
# with apt-get when missing. Prints the build time, the total time and the package's size.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "ci-deb-check: must run as root (it installs and purges the package)" >&2; exit 2; }

say() { printf '== %s\n' "$*"; }
fail() { printf 'ci-deb-check: FAIL: %s\n' "$*" >&2; exit 1; }
package_state() { dpkg-query -W -f='${db:Status-Status}' wlidd 2>/dev/null || echo not-installed; }
purge_package() {
    if [ "$(package_state)" != not-installed ]; then
        dpkg --purge wlidd >/dev/null || dpkg --purge --force-remove-reinstreq wlidd >/dev/null || true
    fi
}

started=$(date +%s)
work=$(mktemp -d /tmp/wlidd-deb-check.XXXXXX)
cleanup() {
    local status=$?
    trap - EXIT
    purge_package
    rm -rf "$work"
    if [ "$status" = 0 ]; then say "passed in $(($(date +%s) - started)) s"; else say "failed (exit $status)"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$(package_state)" != not-installed ]; then
    say "purging the wlidd package an earlier run left ($(package_state))"
    purge_package
fi

missing=()
command -v dh_virtualenv >/dev/null 2>&1 || missing+=(dh-virtualenv)
command -v dh >/dev/null 2>&1 || missing+=(debhelper)
command -v dpkg-buildpackage >/dev/null 2>&1 || missing+=(dpkg-dev)
dpkg-query -W -f='${db:Status-Status}' build-essential 2>/dev/null | grep -qx installed || missing+=(build-essential)
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

say "make deb"
build_started=$(date +%s)
make -s deb >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; fail "make deb"; }
build_seconds=$(($(date +%s) - build_started))
version=$(dpkg-parsechangelog -l debian/changelog -S Version)
deb="build/deb/wlidd_${version}_$(dpkg --print-architecture).deb"
[ -f "$deb" ] || fail "make deb made no $deb"
say "built $deb: $(stat -c %s "$deb") bytes in ${build_seconds} s"

say "the package names neither the build tree nor a home directory"
dpkg-deb -x "$deb" "$work/root"
if hits=$(grep -rlF "$PWD" "$work/root"); then fail "files name the build tree $PWD: $(head -5 <<<"$hits")"; fi
hits=$(find "$work/root" -type l \( -lname '/root/*' -o -lname '/home/*' -o -lname '/tmp/*' \))
[ -z "$hits" ] || fail "symlinks into a directory the unit cannot see: $hits"

say "dpkg -i"
dpkg -i "$deb" >"$work/install.log" 2>&1 || { cat "$work/install.log" >&2; fail "dpkg -i $deb"; }
[ "$(package_state)" = installed ] || fail "wlidd is $(package_state) after dpkg -i"
dpkg -L wlidd | sort >"$work/files"

say "the installed wlidd runs, on the system interpreter"
[ "$(/opt/wlidd/bin/wlidd --version)" = "wlidd $version" ] || fail "/opt/wlidd/bin/wlidd --version"
[ "$(/usr/bin/wlidd --version)" = "wlidd $version" ] || fail "/usr/bin/wlidd --version"
interpreter=$(readlink -f /opt/wlidd/bin/python)
case "$interpreter" in
    /usr/bin/python3*) ;;
    *) fail "/opt/wlidd/bin/python resolves to $interpreter, not the system's /usr/bin/python3.X" ;;
esac

say "the wlidd user, the wlidd-clients group, the conffile, the docs; nothing enabled"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd wlidd) || fail "no wlidd user"
[ "$uid" -lt 1000 ] && [ "$home" = /var/lib/wlidd ] && [ "$shell" = /usr/sbin/nologin ] \
    || fail "wlidd user: uid $uid home $home shell $shell"
[ "$(getent group "$gid" | cut -d: -f1)" = wlidd ] || fail "wlidd's primary group is not wlidd"
getent group wlidd-clients >/dev/null || fail "no wlidd-clients group"
[ "$(stat -c '%a %U:%G' /etc/wlidd/wlidd.toml)" = "644 root:root" ] || fail "/etc/wlidd/wlidd.toml mode/owner"
cmp -s /etc/wlidd/wlidd.toml etc/wlidd.toml || fail "/etc/wlidd/wlidd.toml differs from etc/wlidd.toml"
dpkg-query -W -f='${Conffiles}\n' wlidd | grep -q '^ /etc/wlidd/wlidd.toml ' || fail "wlidd.toml is not a conffile"
for doc in README.md examples/wlidd.toml examples/certificate_config.json; do
    [ -f "/usr/share/doc/wlidd/$doc" ] || fail "no /usr/share/doc/wlidd/$doc"
done
units=$(grep -E '/systemd/system/wlidd\.(service|socket)$' "$work/files") || fail "no units in the package"
[ "$(wc -l <<<"$units")" = 2 ] || fail "units: $units"
grep -q '^ExecStart=/opt/wlidd/bin/wlidd run --config /etc/wlidd/wlidd.toml$' $(grep 'service$' <<<"$units") \
    || fail "the installed unit's ExecStart"
if enabled=$(find /etc/systemd/system -name 'wlidd.*' 2>/dev/null | grep .); then fail "enabled on install: $enabled"; fi
[ ! -e /run/wlidd ] || fail "/run/wlidd exists: something started wlidd"

as_wlidd() {  # a clean environment, / as working directory (this checkout may be unreadable to wlidd)
    (cd / && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/wlidd LANG=C.UTF-8 "$@")
}
say "wlidd check as the wlidd user, the config as installed (no credentials on this host)"
set +e
as_wlidd setpriv --reuid=wlidd --regid=wlidd --init-groups -- \
    /opt/wlidd/bin/wlidd check --config /etc/wlidd/wlidd.toml >"$work/check1" 2>&1
status=$?
set -e
sed 's/^/   /' "$work/check1"
# 0 on a host with GCE credentials; else 1 with the default identity's credentials as the only
# failure. 2 would be a configuration the wlidd user cannot read or load.
case "$status" in
    0) ;;
    1) failures=$(grep -c '^FAIL' "$work/check1" || true)
       [ "$failures" -ge 1 ] && [ "$(grep -c '^FAIL default: ' "$work/check1")" = "$failures" ] \
           || fail "wlidd check failed for something other than the missing credentials" ;;
    *) fail "wlidd check as wlidd exited $status" ;;
esac
! grep -q '^warning:' "$work/check1" || fail "wlidd check warned (the config should need no warning as shipped)"

say "wlidd check as the wlidd user, with GCE-style credentials from the emulator"
chmod 0755 "$work"
/opt/wlidd/bin/python -I - "$work/secrets" <<'EOF'
import sys
from pathlib import Path

from wlidd.emulator.ca import CertificateAuthority
from wlidd.emulator.gce_writer import GceCredentialWriter, gce_files

ca = CertificateAuthority("ci.example.org")
svid = ca.issue_svid("/ns/ci/sa/wlidd")
GceCredentialWriter(Path(sys.argv[1])).rotate(gce_files(svid.chain_pem, svid.key_pem, ca.bundle_pem))
EOF
chown -R wlidd:wlidd "$work/secrets"
as_wlidd WLIDD_IDENTITIES__DEFAULT__DIR="$work/secrets/workload-spiffe-credentials" \
    setpriv --reuid=wlidd --regid=wlidd --init-groups -- \
    /opt/wlidd/bin/wlidd check --config /etc/wlidd/wlidd.toml >"$work/check2" 2>&1 \
    || { cat "$work/check2" >&2; fail "wlidd check as wlidd with credentials"; }
sed 's/^/   /' "$work/check2"
grep -q '^ok   default: spiffe://ci.example.org/ns/ci/sa/wlidd ' "$work/check2" || fail "no ok line for the identity"

say "systemd-analyze verify"
# shellcheck disable=SC2086 # one path per line
systemd-analyze verify $units

say "the installed files are as shipped, and nothing was added under /opt/wlidd (no bytecode written)"
changed=$(dpkg --verify wlidd) && [ -z "$changed" ] || fail "dpkg --verify: installed files changed: $changed"
find /opt/wlidd -mindepth 1 | sort >"$work/present"
if extra=$(comm -13 "$work/files" "$work/present" | grep .); then fail "files not from the package: $(head -5 <<<"$extra")"; fi

say "upgrade to the same package as $version+ci1: the maintainer scripts run again, the admin's config stays"
dpkg-deb -R "$deb" "$work/upgrade"
sed -i "s/^Version: .*/Version: $version+ci1/" "$work/upgrade/DEBIAN/control"
dpkg-deb -Znone -b "$work/upgrade" "$work/upgrade.deb" >/dev/null
echo '# changed by the admin' >>/etc/wlidd/wlidd.toml
dpkg -i "$work/upgrade.deb" >"$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log" >&2; fail "upgrade"; }
[ "$(dpkg-query -W -f='${Version}' wlidd)" = "$version+ci1" ] || fail "not upgraded"
[ "$(tail -1 /etc/wlidd/wlidd.toml)" = '# changed by the admin' ] || fail "the upgrade replaced the admin's config"
[ "$(getent passwd wlidd | cut -d: -f3)" = "$uid" ] || fail "the wlidd user changed on upgrade"
[ "$(/opt/wlidd/bin/wlidd --version)" = "wlidd $version" ] || fail "wlidd --version after the upgrade"

say "dpkg --purge"
dpkg --purge wlidd >"$work/purge.log" 2>&1 || { cat "$work/purge.log" >&2; fail "dpkg --purge"; }
[ "$(package_state)" = not-installed ] || fail "wlidd is $(package_state) after purge"
left=()
while read -r path; do  # the package's files and symlinks (its directories may be shared: /lib, /usr/bin)
    if [ -e "$path" ] || [ -L "$path" ]; then left+=("$path"); fi
done < <(find "$work/root" ! -type d -printf '/%P\n')
for dir in /opt/wlidd /etc/wlidd /usr/share/doc/wlidd /var/lib/wlidd /run/wlidd; do
    [ ! -e "$dir" ] || left+=("$dir")
done
for state in /var/lib/systemd/deb-systemd-helper-enabled/wlidd.service.dsh-also \
    /var/lib/systemd/deb-systemd-helper-enabled/wlidd.socket.dsh-also; do
    [ ! -e "$state" ] || left+=("$state")
done
[ ${#left[@]} = 0 ] || fail "left after purge: ${left[*]}"
getent passwd wlidd >/dev/null && getent group wlidd-clients >/dev/null \
    || fail "purge removed the wlidd user or the wlidd-clients group (they are meant to stay)"
say "purged: no file of the package left; the wlidd user and the wlidd-clients group stay"
