#!/bin/sh
# Builds the relay as a static x86_64 binary and assembles the container image's root
# filesystem in OUT/rootfs (default OUT: /out). The Dockerfile runs exactly this script and
# copies OUT/rootfs into an empty (scratch) image, so the image holds nothing else;
# tests/container_image.rs runs the same script and chroots into the same directory.
#
# Static on glibc needs no musl toolchain: -C target-feature=+crt-static with an explicit
# --target (so build scripts and proc macros stay dynamic). getrandom 0.4 finds getrandom(2)
# with dlsym, which a static binary lacks, and would fall back to /dev/urandom: link
# libc's getrandom directly instead, so the binary needs no /dev at all.
set -eu
out=${1:-/out}
target=x86_64-unknown-linux-gnu
uid=10001
cd "$(dirname "$0")/.."

RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"' \
  CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  cargo build --release --locked --target "$target" --bin smtp-oauth-relay
bin="${CARGO_TARGET_DIR:-target}/$target/release/smtp-oauth-relay"

# Refuse a dynamic binary: the image has no libc.
if command -v file >/dev/null; then
  case "$(file -b "$bin")" in
    *"static-pie linked"* | *"statically linked"*) ;;
    *) echo "build-static.sh: $bin is not static: $(file -b "$bin")" >&2; exit 1 ;;
  esac
fi

rootfs="$out/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/bin" "$rootfs/etc/smtp-oauth-relay" "$rootfs/etc/ssl/certs" \
  "$rootfs/var/lib/smtp-oauth-relay" "$rootfs/run/secrets"
install -m 0755 "$bin" "$rootfs/usr/bin/smtp-oauth-relay"
install -m 0644 deploy/container/relay.toml "$rootfs/etc/smtp-oauth-relay/relay.toml"
# Trust anchors for login.microsoftonline.com and smtp.office365.com (SSL_CERT_FILE).
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'relay:x:%s:%s:smtp-oauth-relay:/var/lib/smtp-oauth-relay:/nonexistent\n' "$uid" "$uid" >"$rootfs/etc/passwd"
printf 'relay:x:%s:\n' "$uid" >"$rootfs/etc/group"
# The spool (a volume in practice); owned by the runtime user, private.
if [ "$(id -u)" = 0 ]; then chown "$uid:$uid" "$rootfs/var/lib/smtp-oauth-relay"; fi
chmod 0700 "$rootfs/var/lib/smtp-oauth-relay"
echo "rootfs: $rootfs ($(du -sb "$rootfs" | cut -f1) bytes)"
