#!/bin/sh
# Installs a release of fleet-bundler: the static Linux binary for this machine's
# architecture (x86_64 or aarch64), checked against the release's SHA-256 sums.
#
#   install-fleet-bundler.sh VERSION [--base-url URL] [--dir DIR] [--arch ARCH] [--sha256 HEX]
#
#   VERSION          the release, 0.1.0 or v0.1.0
#   --base-url URL   where releases live: the files of VERSION are under URL/v<VERSION>/
#                    (GitHub: https://github.com/OWNER/REPO/releases/download); default:
#                    $FLEET_BUNDLER_BASE_URL
#   --dir DIR        install as DIR/fleet-bundler (created if needed); default: /usr/local/bin
#                    when writable, else $HOME/.local/bin
#   --arch ARCH      x86_64/amd64 or aarch64/arm64 instead of `uname -m`
#   --sha256 HEX     the binary's expected SHA-256: a pin that does not trust the release's
#                    checksum file (which comes from the same server as the binary)
#
# A release directory holds fleet-bundler-<triple> (x86_64-unknown-linux-musl,
# aarch64-unknown-linux-musl) and fleet-bundler-SHA256SUMS (`sha256sum` format), as
# cross/release.sh writes them into dist/.
#
# The binary is downloaded into a temp dir, checked, and only then moved into DIR, so a
# failed download or a checksum mismatch never leaves a binary behind. When it can run
# here, `fleet-bundler --version` must name VERSION. The last line of output is the
# installed path. Needs: curl or wget, sha256sum (or shasum), mktemp.
# Exit codes: 0 installed, 1 failure (download, checksum, version), 2 usage.
set -eu

prog=install-fleet-bundler.sh
die() {
    echo "$prog: error: $*" >&2
    exit 1
}
usage_error() {
    echo "$prog: $*" >&2
    echo "usage: $prog VERSION [--base-url URL] [--dir DIR] [--arch ARCH] [--sha256 HEX]" >&2
    exit 2
}

version=""
base_url="${FLEET_BUNDLER_BASE_URL:-}"
dir=""
arch=""
pin=""
while [ $# -gt 0 ]; do
    case "$1" in
        --base-url | --dir | --arch | --sha256)
            [ $# -ge 2 ] || usage_error "$1 needs a value"
            case "$1" in
                --base-url) base_url="$2" ;;
                --dir) dir="$2" ;;
                --arch) arch="$2" ;;
                --sha256) pin="$2" ;;
            esac
            shift 2
            ;;
        --base-url=*) base_url="${1#*=}" && shift ;;
        --dir=*) dir="${1#*=}" && shift ;;
        --arch=*) arch="${1#*=}" && shift ;;
        --sha256=*) pin="${1#*=}" && shift ;;
        -h | --help)
            sed -n '2,/^set -eu/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        -*) usage_error "unknown option: $1" ;;
        *)
            [ -z "$version" ] || usage_error "unexpected argument: $1"
            version="$1"
            shift
            ;;
    esac
done

version="${version#v}"
[ -n "$version" ] || usage_error "no VERSION given"
case "$version" in
    *[!0-9A-Za-z.+-]*) usage_error "not a version: $version" ;;
esac
[ -n "$base_url" ] || usage_error "no release location: pass --base-url URL or set FLEET_BUNDLER_BASE_URL"
base_url="${base_url%/}"
if [ -n "$pin" ]; then
    pin="$(printf '%s' "$pin" | tr 'A-F' 'a-f')"
    case "$pin" in
        *[!0-9a-f]*) usage_error "--sha256 is not a hex digest: $pin" ;;
    esac
    [ "${#pin}" -eq 64 ] || usage_error "--sha256 must be 64 hex digits, not ${#pin}"
fi

[ -n "$arch" ] || arch="$(uname -m)"
case "$arch" in
    x86_64 | amd64 | x86_64-unknown-linux-musl) triple=x86_64-unknown-linux-musl ;;
    aarch64 | arm64 | aarch64-unknown-linux-musl) triple=aarch64-unknown-linux-musl ;;
    *) die "no fleet-bundler release for architecture '$arch' (there are x86_64 and aarch64)" ;;
esac
if [ "$(uname -s)" != Linux ]; then
    echo "$prog: warning: the release binaries are for Linux; this is $(uname -s)" >&2
fi

if [ -z "$dir" ]; then
    if [ -w /usr/local/bin ]; then
        dir=/usr/local/bin
    else
        dir="${HOME:?neither /usr/local/bin is writable nor HOME set: pass --dir}/.local/bin"
    fi
fi

# fetch URL FILE: fails (with the tool's message) on any HTTP error.
if command -v curl >/dev/null 2>&1; then
    fetch() { curl -fsSL --retry 3 --connect-timeout 20 -o "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
    # GNU wget, or busybox's: Debian's busybox 1.35 wget has no -T and crashes on it.
    case "$(wget --help 2>&1)" in
        *--tries*) wget_opts="-q -T 20 -t 3" ;;
        *"-T SEC"*) wget_opts="-q -T 20" ;;
        *) wget_opts="-q" ;;
    esac
    # shellcheck disable=SC2086 # wget_opts is a list of options
    fetch() { wget $wget_opts -O "$2" "$1"; }
else
    die "neither curl nor wget is installed"
fi

# sha256 FILE: prints the lowercase hex digest.
sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | awk '{ print $1 }'
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | awk '{ print $1 }'
    else
        die "neither sha256sum nor shasum is installed"
    fi
}

name="fleet-bundler-$triple"
release_url="$base_url/v$version"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' HUP INT TERM

echo "$prog: fleet-bundler $version for $triple from $release_url/" >&2
fetch "$release_url/$name" "$tmp/$name" || die "cannot download $release_url/$name"
actual="$(sha256 "$tmp/$name")"
if [ -n "$pin" ]; then
    expected="$pin"
    source="--sha256"
else
    fetch "$release_url/fleet-bundler-SHA256SUMS" "$tmp/SHA256SUMS" ||
        die "cannot download $release_url/fleet-bundler-SHA256SUMS"
    expected="$(awk -v f="$name" '$2 == f || $2 == "*" f { print $1; exit }' "$tmp/SHA256SUMS" | tr 'A-F' 'a-f')"
    [ -n "$expected" ] || die "$release_url/fleet-bundler-SHA256SUMS has no line for $name"
    source="fleet-bundler-SHA256SUMS"
fi
if [ "$actual" != "$expected" ]; then
    die "checksum mismatch for $release_url/$name: expected $expected ($source), got $actual; nothing installed"
fi
chmod 0755 "$tmp/$name"

# When this machine runs the binary, it must be the version asked for.
if got="$("$tmp/$name" --version 2>/dev/null)"; then
    [ "$got" = "fleet-bundler $version" ] ||
        die "$release_url/$name says '$got', not 'fleet-bundler $version'; nothing installed"
fi

mkdir -p "$dir" || die "cannot create $dir"
# Same directory, then rename: a running fleet-bundler is never overwritten in place.
cp "$tmp/$name" "$dir/.fleet-bundler.tmp.$$" || die "cannot write to $dir"
mv -f "$dir/.fleet-bundler.tmp.$$" "$dir/fleet-bundler" || die "cannot install into $dir"
echo "$prog: installed fleet-bundler $version ($triple, sha256 $actual)" >&2
echo "$dir/fleet-bundler"
