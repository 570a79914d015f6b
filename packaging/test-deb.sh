#!/usr/bin/env bash
# Installs, upgrades, removes and purges the edgeship package and checks each step.
#
#   packaging/test-deb.sh DEB_N DEB_N1      (as root; DEB_N1 a higher version of the same arch)
#
# For CI on a Debian machine where systemd is not PID 1 (a container): the maintainer scripts'
# systemd calls are then skipped, as they are designed to be. Needs adduser, ca-certificates and
# systemd (for systemd-analyze) installed. Prints one line per check passed; stops at the first
# failed check with a message and exit status 1. The package is purged on every exit, and the
# edgeship user and group are removed if this script created them.
set -euo pipefail

die() {
	echo "test-deb.sh: FAIL: $*" >&2
	exit 1
}
ok() { echo "ok - $*"; }

[ $# -eq 2 ] || {
	sed -n '4p' "${BASH_SOURCE[0]}" | sed 's/^#  *//' >&2
	exit 2
}
deb_n=$(realpath "$1")
deb_n1=$(realpath "$2")
[ "$(id -u)" -eq 0 ] || die "must run as root"

unit=/usr/lib/systemd/system/edgeship.service
config=/etc/edgeship/edgeship.toml
state=/var/lib/edgeship
canary=$state/spool-canary
wants=/etc/systemd/system/multi-user.target.wants/edgeship.service
mask=/etc/systemd/system/edgeship.service
dsh_state=/var/lib/systemd/deb-systemd-helper-enabled/edgeship.service.dsh-also

# --- Preconditions: a machine this test may install on and purge afterwards. ---
for tool in dpkg dpkg-deb systemd-analyze runuser adduser; do
	command -v "$tool" >/dev/null || die "$tool is missing: apt-get install -y adduser ca-certificates systemd"
done
[ -f /etc/ssl/certs/ca-certificates.crt ] || die "ca-certificates is not installed (a dependency)"
if dpkg-query -W -f='${db:Status-Status}' edgeship 2>/dev/null | grep -qv '^not-installed$'; then
	die "edgeship is already on this machine; this test purges it, so it runs only where it is absent"
fi
for path in "$state" /etc/edgeship; do
	[ ! -e "$path" ] || die "$path exists already; this test removes it, so it runs only where it is absent"
done
version_n=$(dpkg-deb -f "$deb_n" Version)
version_n1=$(dpkg-deb -f "$deb_n1" Version)
for deb in "$deb_n" "$deb_n1"; do
	[ "$(dpkg-deb -f "$deb" Package)" = edgeship ] || die "$deb is not an edgeship package"
done
dpkg --compare-versions "$version_n1" gt "$version_n" || die "$version_n1 is not above $version_n"
user_existed=""
getent passwd edgeship >/dev/null && user_existed=1
group_existed=""
getent group edgeship >/dev/null && group_existed=1

work=$(mktemp -d)
cleanup() {
	status=$?
	set +e
	if dpkg-query -W -f='${db:Status-Status}' edgeship 2>/dev/null | grep -qv '^not-installed$'; then
		dpkg --purge edgeship >"$work/cleanup.log" 2>&1 || cat "$work/cleanup.log" >&2
	fi
	# What a failed purge may have left; neither existed before the test.
	rm -rf "$state" /etc/edgeship
	[ -n "$user_existed" ] || userdel edgeship 2>/dev/null
	[ -n "$group_existed" ] || groupdel edgeship 2>/dev/null
	rm -rf "$work"
	if [ "$status" -eq 0 ]; then
		echo "test-deb.sh: all checks passed; edgeship purged"
	else
		echo "test-deb.sh: edgeship purged after the failure" >&2
	fi
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs dpkg quietly; shows its output when it fails. stdin is /dev/null: a conffile prompt
# fails instead of waiting.
dpkg_step() {
	local what=$1
	shift
	if ! dpkg "$@" </dev/null >"$work/dpkg.log" 2>&1; then
		cat "$work/dpkg.log" >&2
		die "$what: dpkg $* failed"
	fi
	grep -q "^dpkg: warning" "$work/dpkg.log" && { cat "$work/dpkg.log" >&2; die "$what: dpkg warned"; }
	ok "$what"
}
expect_mode() { # path, "mode owner:group"
	local got
	got=$(stat -c '%a %U:%G' "$1")
	[ "$got" = "$2" ] || die "$1 is $got, expected $2"
	ok "$1 is $2"
}
identity() { stat -c '%d:%i %U:%G %a' "$1"; }

# --- Version N: a first install. ---
dpkg_step "dpkg -i $(basename "$deb_n")" -i "$deb_n"
[ "$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' edgeship)" = "ii  $version_n" ] ||
	die "edgeship $version_n is not installed ($(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' edgeship))"
ok "edgeship $version_n installed"
for f in /usr/bin/edgeship "$config" "$unit" /usr/share/man/man1/edgeship.1.gz /usr/share/doc/edgeship/copyright; do
	[ -f "$f" ] || die "$f is missing"
done
ok "files in place: binary, config, unit, man page, copyright"
dpkg-query -W -f='${Conffiles}\n' edgeship | grep -q "^ $config [0-9a-f]\{32\}$" ||
	die "$config is not a conffile"
ok "$config is a conffile"
[ -z "$(dpkg --verify edgeship)" ] || die "dpkg --verify: $(dpkg --verify edgeship)"
ok "dpkg --verify: every file matches the package"

IFS=: read -r _ _ uid gid _ home shell < <(getent passwd edgeship) || die "no user edgeship"
[ "$uid" -lt 1000 ] || die "edgeship has uid $uid: not a system user"
[ "$(getent group edgeship | cut -d: -f3)" = "$gid" ] || die "edgeship's primary group is not edgeship"
[ "$shell" = /usr/sbin/nologin ] || die "edgeship's shell is $shell, not /usr/sbin/nologin"
[ "$home" = "$state" ] || die "edgeship's home is $home, not $state"
ok "system user edgeship (uid $uid), group edgeship, shell $shell, home $home"
expect_mode /usr/bin/edgeship "755 root:root"
expect_mode "$config" "640 root:edgeship"
expect_mode "$state" "750 edgeship:edgeship"

reported=$(/usr/bin/edgeship --version) || die "edgeship --version failed"
[[ "$reported" == "edgeship "* ]] || die "edgeship --version printed '$reported'"
ok "edgeship --version: $reported"
edgeship config validate "$config" >/dev/null || die "config validate $config failed as root"
ok "edgeship config validate $config (root)"
runuser -u edgeship -- edgeship config validate "$config" >/dev/null ||
	die "config validate $config failed as user edgeship"
ok "edgeship config validate $config (user edgeship)"
if runuser -u nobody -- cat "$config" >/dev/null 2>&1; then
	die "user nobody can read $config"
fi
ok "user nobody cannot read $config"

# --man=no: containers often leave man pages out; the page's presence is checked above.
systemd-analyze verify --man=no "$unit" >"$work/verify.log" 2>&1 || {
	cat "$work/verify.log" >&2
	die "systemd-analyze verify $unit"
}
[ ! -s "$work/verify.log" ] || { cat "$work/verify.log" >&2; die "systemd-analyze verify printed warnings"; }
ok "systemd-analyze verify $unit"
# Exposure above 2.0 means hardening was lost (1.2 when written). Needs systemd >= 250.
if systemd-analyze security --offline=true --threshold=20 "$unit" >"$work/security.log" 2>&1; then
	ok "systemd-analyze security: $(grep -o 'exposure level.*' "$work/security.log")"
elif grep -q "exposure level" "$work/security.log"; then
	die "systemd-analyze security: $(grep -o 'exposure level.*' "$work/security.log"), above 2.0"
else
	echo "skip - systemd-analyze security --offline needs systemd >= 250"
fi
[ "$(readlink "$wants")" = "$unit" ] || [ "$(readlink "$wants")" = /lib/systemd/system/edgeship.service ] ||
	die "the unit was not enabled ($wants missing)"
ok "unit enabled by deb-systemd-helper ($wants)"

# --- A spool with a local config change, then version N+1 over it. ---
runuser -u edgeship -- sh -c "umask 077 && echo 'records not yet delivered' >'$canary'"
state_before=$(identity "$state")
canary_before=$(identity "$canary")
ok "spool canary written as edgeship: $canary"
if grep -q '^gateway_id *=' "$config"; then
	sed -i 's/^gateway_id *=.*/gateway_id = "gw-test-deb"/' "$config"
else
	sed -i '1i gateway_id = "gw-test-deb"' "$config"
fi
runuser -u edgeship -- edgeship config validate "$config" >/dev/null || die "the locally changed config is invalid"
ok "config changed locally (gateway_id = \"gw-test-deb\")"

# dpkg asks about a changed conffile only if the new package's default differs from the old
# one. If N and N+1 ship the same default, N+1 is repacked with one more comment line in it.
repack_with_new_default() { # name, comment line: prints the path of N+1 repacked
	rm -rf "$work/repack"
	dpkg-deb -R "$deb_n1" "$work/repack"
	echo "$2" >>"$work/repack$config"
	dpkg-deb --root-owner-group -b "$work/repack" "$work/$1.deb" >/dev/null
	echo "$work/$1.deb"
}
deb_up=$deb_n1
if cmp -s <(dpkg-deb --fsys-tarfile "$deb_n" | tar -xO ".$config") \
	<(dpkg-deb --fsys-tarfile "$deb_n1" | tar -xO ".$config"); then
	deb_up=$(repack_with_new_default upgrade "# new default shipped by $version_n1")
	ok "N+1 repacked with a changed default config, so the upgrade meets a conffile conflict"
fi
dpkg_step "upgrade to $version_n1 with --force-confold (no prompt)" --force-confold -i "$deb_up"
[ "$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' edgeship)" = "ii  $version_n1" ] ||
	die "edgeship $version_n1 is not installed after the upgrade"
ok "edgeship $version_n1 installed"
cmp -s /usr/bin/edgeship <(dpkg-deb --fsys-tarfile "$deb_n1" | tar -xO ./usr/bin/edgeship) ||
	die "/usr/bin/edgeship is not the binary of $version_n1"
ok "/usr/bin/edgeship is the binary of $version_n1"
grep -q '^gateway_id = "gw-test-deb"$' "$config" || die "the local config change was lost"
[ -f "$config.dpkg-dist" ] || die "the new default config was not saved as $config.dpkg-dist"
ok "local config kept; new default in $config.dpkg-dist"
expect_mode "$config" "640 root:edgeship"
[ "$(identity "$state")" = "$state_before" ] || die "$state changed: $(identity "$state"), was $state_before"
ok "$state kept: same inode, owner and mode ($state_before)"
[ "$(identity "$canary")" = "$canary_before" ] || die "$canary changed: $(identity "$canary"), was $canary_before"
[ "$(cat "$canary")" = "records not yet delivered" ] || die "$canary lost its content"
ok "$canary kept: same inode, owner, mode and content"

# Taking a new default (--force-confnew) makes dpkg write it as root:root 0644; postinst
# must give it back to the edgeship group, mode 0640. (A reinstall conflicts only if the
# default differs from the one installed, hence another repack.)
deb_new=$(repack_with_new_default confnew "# another default, taken with --force-confnew")
dpkg_step "reinstall $version_n1 (another default config) with --force-confnew" --force-confnew -i "$deb_new"
grep -q '^# another default, taken with --force-confnew$' "$config" ||
	die "--force-confnew did not install the new default config"
grep -q '^gateway_id = "gw-test-deb"$' "$config.dpkg-old" || die "the local config was not saved as $config.dpkg-old"
ok "new default config installed; local one saved as $config.dpkg-old"
expect_mode "$config" "640 root:edgeship"
[ "$(identity "$canary")" = "$canary_before" ] || die "$canary changed on reinstall"
ok "$canary kept on reinstall"

# --- Remove: the program goes, the spool and the config stay. ---
dpkg_step "dpkg -r edgeship" -r edgeship
[ "$(dpkg-query -W -f='${db:Status-Abbrev}' edgeship)" = "rc " ] || die "edgeship is not in state config-files"
for f in /usr/bin/edgeship "$unit"; do
	[ ! -e "$f" ] || die "$f is still there after remove"
done
ok "binary and unit removed"
[ "$(identity "$canary")" = "$canary_before" ] || die "$canary did not survive dpkg -r"
[ "$(identity "$state")" = "$state_before" ] || die "$state changed on dpkg -r"
ok "$state and its files kept after remove"
[ -f "$config" ] || die "$config was removed by dpkg -r"
ok "$config kept after remove"
[ "$(readlink "$mask")" = /dev/null ] || die "the unit was not masked on remove ($mask)"
ok "unit masked after remove"

# --- Purge: nothing of the package is left but the system user. ---
dpkg_step "dpkg -P edgeship" -P edgeship
[ "$(dpkg-query -W -f='${db:Status-Status}' edgeship 2>/dev/null || echo not-installed)" = not-installed ] ||
	die "edgeship is still known to dpkg after purge"
ok "edgeship purged from dpkg's database"
for path in "$state" /etc/edgeship; do
	[ ! -e "$path" ] || die "$path is still there after purge"
	ok "$path removed by purge"
done
for path in "$wants" "$mask" "$dsh_state"; do
	if [ -e "$path" ] || [ -L "$path" ]; then die "$path is still there after purge"; fi
done
ok "systemd enable links, mask and deb-systemd-helper state removed"
getent passwd edgeship >/dev/null || die "purge removed the user edgeship (it must stay)"
ok "user edgeship kept after purge, by design (files elsewhere may still carry its uid)"
