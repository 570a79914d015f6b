#!/usr/bin/env bash
# Builds edgeship_<version>_<arch>.deb from an edgeship binary that is already built.
#
#   packaging/build-deb.sh --arch amd64|arm64|armhf --binary PATH [--version V] [--out DIR]
#
# dpkg-deb, not cargo-deb: CI builds and tests one binary per target (cross/ for the ARM ones);
# packaging puts that very binary in the .deb and compiles nothing, so it needs no Rust
# toolchain, only dpkg-deb, binutils (readelf, a strip for the target) and coreutils.
#
# Version: --version, else [package] version from Cargo.toml. Set SOURCE_DATE_EPOCH for a
# reproducible build; default: the date of the changelog's newest entry.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

die() {
	echo "build-deb.sh: $*" >&2
	exit 1
}
note() { echo "build-deb.sh: $*" >&2; }
usage() {
	sed -n '4p' "${BASH_SOURCE[0]}" | sed 's/^#  *//' >&2
	exit 2
}

arch="" binary="" version="" out="$PWD"
while [ $# -gt 0 ]; do
	case "$1" in
	--arch) arch=${2:-}; shift 2 || usage ;;
	--binary) binary=${2:-}; shift 2 || usage ;;
	--version) version=${2:-}; shift 2 || usage ;;
	--out) out=${2:-}; shift 2 || usage ;;
	-h | --help) usage ;;
	*) echo "build-deb.sh: unknown argument: $1" >&2; usage ;;
	esac
done
if [ -z "$arch" ] || [ -z "$binary" ]; then usage; fi
[ -f "$binary" ] || die "no binary at $binary"
for tool in dpkg-deb readelf gzip md5sum find; do
	command -v "$tool" >/dev/null || die "$tool is needed (apt-get install dpkg binutils coreutils findutils gzip)"
done

# What each architecture's binary must look like, how to strip it and how to run it here.
case "$arch" in
amd64)
	machine="Advanced Micro Devices X86-64" interp=/lib64/ld-linux-x86-64.so.2
	triplet=x86_64-linux-gnu qemu="" ;;
arm64)
	machine="AArch64" interp=/lib/ld-linux-aarch64.so.1
	triplet=aarch64-linux-gnu qemu=qemu-aarch64-static ;;
armhf)
	machine="ARM" interp=/lib/ld-linux-armhf.so.3
	triplet=arm-linux-gnueabihf qemu=qemu-arm-static ;;
*) die "--arch must be amd64, arm64 or armhf, not '$arch'" ;;
esac

if [ -z "$version" ]; then
	version=$(awk '/^\[/ { pkg = ($0 == "[package]") }
		pkg && /^version *=/ { gsub(/^[^"]*"|".*$/, ""); print; exit }' "$repo/Cargo.toml")
	[ -n "$version" ] || die "no [package] version in $repo/Cargo.toml; pass --version"
fi
# Debian version syntax: [epoch:]upstream[-revision], upstream starting with a digit.
[[ "$version" =~ ^([0-9]+:)?[0-9][A-Za-z0-9.+~]*(-[A-Za-z0-9.+~]+)?$ ]] ||
	die "'$version' is not a Debian version"
file_version=${version#*:}

# --- Check the binary is the one for this architecture. ---
header=$(readelf -h "$binary" 2>/dev/null) || die "$binary is not an ELF file"
grep -q "Machine: *$machine\$" <<<"$header" ||
	die "$binary is not an $arch binary ($(sed -n 's/^ *Machine: *//p' <<<"$header"))"
if [ "$arch" = armhf ]; then
	grep -q "hard-float ABI" <<<"$header" || die "$binary is not a hard-float (armhf) binary"
fi
program_interp=$(readelf -lW "$binary" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
if [ -n "$program_interp" ] && [ "$program_interp" != "$interp" ]; then
	die "$binary asks for the loader $program_interp, not Debian's $interp for $arch"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"

# --- Strip a copy (symbols, .comment and .note, as dh_strip does); the first tool that
# understands this architecture wins. ---
mkdir -p "$root/usr/bin"
stripped=""
for tool in "$triplet-strip" llvm-strip strip; do
	command -v "$tool" >/dev/null || continue
	if "$tool" --strip-all --remove-section=.comment --remove-section=.note \
		-o "$root/usr/bin/edgeship" "$binary" 2>/dev/null; then
		stripped=$tool
		break
	fi
done
[ -n "$stripped" ] || die "no strip here understands $arch binaries: apt-get install binutils-$triplet (or llvm)"
readelf -SW "$root/usr/bin/edgeship" | grep -q ' \.symtab ' && die "$stripped left a symbol table in place"
chmod 0755 "$root/usr/bin/edgeship"

# --- Can this host run the binary (natively or under qemu-user with the cross sysroot)? ---
run=()
if "$root/usr/bin/edgeship" --version >/dev/null 2>&1; then
	run=("$root/usr/bin/edgeship")
elif [ -n "$qemu" ] && command -v "$qemu" >/dev/null && [ -d "/usr/$triplet" ] &&
	"$qemu" -L "/usr/$triplet" "$root/usr/bin/edgeship" --version >/dev/null 2>&1; then
	run=("$qemu" -L "/usr/$triplet" "$root/usr/bin/edgeship")
fi
if [ ${#run[@]} -gt 0 ]; then
	reported=$("${run[@]}" --version)
	upstream=${file_version%-*}
	[ "$reported" = "edgeship $upstream" ] ||
		note "note: the binary reports '$reported'; the package version is $version"
fi

# --- Depends, from the shared libraries and symbol versions the binary needs. ---
needs_glibc="" needs_libgcc=""
while read -r lib; do
	case "$lib" in
	libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*) needs_glibc=1 ;;
	libgcc_s.so.1) needs_libgcc=1 ;;
	*) die "the binary needs $lib: add its Debian package to Depends in build-deb.sh" ;;
	esac
done < <(readelf -dW "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
# Highest symbol version of each library, as dpkg-shlibdeps would find it from the symbols
# files: GLIBC_2.34 -> libc6 (>= 2.34), GCC_4.2.0 -> libgcc-s1 (>= 4.2).
highest() { readelf -VW "$binary" | grep -o "Name: $1_[0-9][0-9.]*" | sed "s/^Name: $1_//" | sort -uV | tail -n 1; }
depends=()
if [ -n "$needs_glibc" ]; then
	glibc=$(highest GLIBC)
	depends+=("libc6${glibc:+ (>= $glibc)}")
fi
if [ -n "$needs_libgcc" ]; then
	gcc=$(highest GCC | cut -d. -f1-2)
	depends+=("libgcc-s1${gcc:+ (>= $gcc)}")
fi
# adduser: postinst creates the system user. ca-certificates: TLS to AWS uses the system's
# trust store (/etc/ssl/certs/ca-certificates.crt).
depends+=(adduser ca-certificates)
depends_line=$(printf '%s, ' "${depends[@]}")
depends_line=${depends_line%, }

# --- The config: the project's default, with the spool under /var/lib/edgeship. ---
mkdir -p "$root/etc/edgeship"
config="$root/etc/edgeship/edgeship.toml"
awk '/^\[/ { spool = ($0 == "[spool]") }
	spool && /^path *=/ && $0 !~ /"\/var\/lib\/edgeship\// {
		print "path = \"/var/lib/edgeship/spool.db\""; changed = 1; next }
	{ print }
	END { if (changed) print "build-deb.sh: spool.path rewritten to /var/lib/edgeship/spool.db" > "/dev/stderr" }' \
	"$repo/config/edgeship.toml" >"$config"
# 0644 in the archive: the default holds no secret; postinst makes it root:edgeship 0640.
chmod 0644 "$config"
if [ ${#run[@]} -gt 0 ]; then
	"${run[@]}" config validate "$config" >/dev/null || die "the packaged config does not validate"
else
	note "note: cannot run an $arch binary here; the packaged config was not validated"
fi

# --- The unit, the man page, the docs. ---
install -D -m 0644 "$here/systemd/edgeship.service" "$root/usr/lib/systemd/system/edgeship.service"
install -d -m 0755 "$root/usr/share/man/man1" "$root/usr/share/doc/edgeship"
gzip -9n <"$here/man/edgeship.1" >"$root/usr/share/man/man1/edgeship.1.gz"
install -m 0644 "$here/debian/copyright" "$root/usr/share/doc/edgeship/copyright"
if [ -f "$here/debian/lintian-overrides" ]; then
	install -D -m 0644 "$here/debian/lintian-overrides" "$root/usr/share/lintian/overrides/edgeship"
fi

# The changelog; a build of a version it does not name gets a generated entry on top.
changelog="$work/changelog"
top=$(sed -n '1s/^edgeship (\([^)]*\)).*/\1/p' "$here/debian/changelog")
maintainer=$(sed -n 's/^Maintainer: *//p' "$here/debian/control")
if [ "$top" = "$version" ]; then
	cp "$here/debian/changelog" "$changelog"
	: "${SOURCE_DATE_EPOCH:=$(date -d "$(sed -n 's/^ -- .*>  //p' "$changelog" | head -n 1)" +%s)}"
else
	: "${SOURCE_DATE_EPOCH:=$(date +%s)}"
	{
		printf 'edgeship (%s) unstable; urgency=medium\n\n' "$version"
		printf '  * Package build of version %s.\n\n' "$version"
		printf ' -- %s  %s\n\n' "$maintainer" "$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
		cat "$here/debian/changelog"
	} >"$changelog"
fi
export SOURCE_DATE_EPOCH
# Native versions (no Debian revision) name it changelog.gz, others changelog.Debian.gz.
case "$file_version" in
*-*) changelog_name=changelog.Debian.gz ;;
*) changelog_name=changelog.gz ;;
esac
gzip -9n <"$changelog" >"$root/usr/share/doc/edgeship/$changelog_name"

# --- Check the unit with the staged binary in place of /usr/bin/edgeship. ---
if command -v systemd-analyze >/dev/null; then
	mkdir "$work/unit"
	sed "s|/usr/bin/edgeship|$root/usr/bin/edgeship|g" "$root/usr/lib/systemd/system/edgeship.service" \
		>"$work/unit/edgeship.service"
	systemd-analyze verify --man=no "$work/unit/edgeship.service" ||
		die "systemd-analyze verify rejects packaging/systemd/edgeship.service"
else
	note "note: systemd-analyze not found; the unit was not verified"
fi

# --- DEBIAN/: control, conffiles, md5sums, maintainer scripts. ---
find "$root" -type d -exec chmod 0755 {} +
find "$root" -type f ! -path "$root/usr/bin/*" -exec chmod 0644 {} +
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
# Installed-Size as dpkg-gencontrol counts it: KiB per file rounded up, 1 per directory.
installed_size=$(find "$root" -mindepth 1 \( -type f -printf 'f %s\n' \) -o -printf 'd\n' |
	awk '{ total += ($1 == "f") ? int(($2 + 1023) / 1024) : 1 } END { print total }')
mkdir -m 0755 "$root/DEBIAN"
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@INSTALLED_SIZE@|$installed_size|" \
	-e "s|@DEPENDS@|$depends_line|" "$here/debian/control" >"$root/DEBIAN/control"
grep -q '@[A-Z_]*@' "$root/DEBIAN/control" && die "a placeholder is left in DEBIAN/control"
echo /etc/edgeship/edgeship.toml >"$root/DEBIAN/conffiles"
# Conffiles are left out of md5sums, as dh_md5sums does: dpkg records their sums itself.
(cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\n' | LC_ALL=C sort |
	xargs -d '\n' md5sum) >"$root/DEBIAN/md5sums"
for script in postinst prerm postrm; do
	install -m 0755 "$here/debian/$script" "$root/DEBIAN/$script"
done
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"
find "$root/DEBIAN" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$out"
deb="$out/edgeship_${file_version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
note "built $(basename "$deb"): $(du -k "$deb" | cut -f1) KiB, Installed-Size $installed_size KiB, stripped with $stripped"
note "Depends: $depends_line"
