#!/bin/sh
# Checks a built smtp-oauth-relay-sendmail .deb: the MTA interface (Debian Policy 11.6), the
# relation fields, the drop directory and the unit drop-in, and that it ships neither the
# binary nor a unit of its own (those stay in smtp-oauth-relay).
#   deploy/check-deb-sendmail.sh path/to/smtp-oauth-relay-sendmail_*.deb
set -eu
deb=$1
fail() { echo "check-deb-sendmail: $*" >&2; exit 1; }
contents=$(dpkg-deb -c "$deb")
echo "$contents"
for f in ./usr/sbin/sendmail ./usr/lib/sendmail ./usr/bin/mailq ./usr/bin/newaliases; do
  echo "$contents" | grep -Eq "^-rwxr-xr-x (root/root|0/0) .* $f\$" || fail "$f missing or not 0755 root"
done
for f in ./usr/lib/sysusers.d/smtp-oauth-relay-sendmail.conf \
  ./usr/lib/tmpfiles.d/smtp-oauth-relay-sendmail.conf \
  ./usr/lib/systemd/system/smtp-oauth-relay.service.d/sendmail.conf; do
  echo "$contents" | awk '{print $6}' | grep -qx "$f" || fail "$f missing"
done
echo "$contents" | awk '{print $6}' | grep -Eq '/usr/bin/smtp-oauth-relay$|\.service$' \
  && fail "ships the binary or a unit (they belong to smtp-oauth-relay)"
for field in Provides Conflicts Replaces; do
  [ "$(dpkg-deb -f "$deb" "$field")" = mail-transport-agent ] || fail "$field is not mail-transport-agent"
done
dpkg-deb -f "$deb" Depends | grep -q '^smtp-oauth-relay' || fail "does not depend on smtp-oauth-relay"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp/root"
dpkg-deb -e "$deb" "$tmp/control"
for s in usr/sbin/sendmail usr/bin/mailq usr/bin/newaliases; do sh -n "$tmp/root/$s" || fail "$s: syntax"; done
grep -q 'exec /usr/bin/smtp-oauth-relay sendmail "$@"' "$tmp/root/usr/sbin/sendmail" || fail "sendmail does not run the relay's sendmail"
sh "$tmp/root/usr/bin/newaliases" || fail "newaliases does not exit 0"
grep -q '^d /var/spool/smtp-oauth-relay 2773 root smtp-oauth-relay-drop' \
  "$tmp/root/usr/lib/tmpfiles.d/smtp-oauth-relay-sendmail.conf" || fail "drop directory not 2773 root:smtp-oauth-relay-drop"
grep -q '^SupplementaryGroups=smtp-oauth-relay-drop$' \
  "$tmp/root/usr/lib/systemd/system/smtp-oauth-relay.service.d/sendmail.conf" || fail "drop-in lacks the group"
sh -n "$tmp/control/postinst" || fail "postinst: syntax"
dpkg-deb -f "$deb" Package Version Architecture Depends Provides Conflicts Replaces
echo "check-deb-sendmail: ok"
