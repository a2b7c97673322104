#!/bin/sh
# Checks a built smtp-oauth-relay .deb: files, conffile, systemd maintainer scripts.
#   deploy/check-deb.sh path/to/smtp-oauth-relay_*.deb
set -eu
deb=$1
contents=$(dpkg-deb -c "$deb")
echo "$contents"
names=$(echo "$contents" | awk '{print $6}')
for f in ./usr/bin/smtp-oauth-relay ./etc/smtp-oauth-relay/relay.toml; do
  echo "$names" | grep -qx "$f" || { echo "check-deb: $f missing" >&2; exit 1; }
done
# cargo-deb 3 uses the merged-/usr path; /lib is a symlink to /usr/lib on Debian 12 and later.
echo "$names" | grep -Eqx '\./(usr/)?lib/systemd/system/smtp-oauth-relay\.service' \
  || { echo "check-deb: unit missing" >&2; exit 1; }
echo "$contents" | grep -Eq '^-rwxr-xr-x (root/root|0/0) .* \./usr/bin/smtp-oauth-relay$' \
  || { echo "check-deb: binary mode/owner wrong" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -e "$deb" "$tmp"
grep -qx /etc/smtp-oauth-relay/relay.toml "$tmp/conffiles" || { echo "check-deb: relay.toml is not a conffile" >&2; exit 1; }
grep -q 'deb-systemd-helper.*enable.*smtp-oauth-relay.service' "$tmp/postinst" || { echo "check-deb: postinst does not enable the unit" >&2; exit 1; }
grep -q 'deb-systemd-invoke.*smtp-oauth-relay.service' "$tmp/postinst" || { echo "check-deb: postinst does not start the unit" >&2; exit 1; }
dpkg-deb -f "$deb" Package Version Architecture Depends
echo "check-deb: ok"
