# Private Postfix instance helpers (sourced by bench/run.sh). Everything lives under $1; nothing
# touches /etc/postfix or the system queue. smtpd listens on 127.0.0.1:$2 only.
#   pf_setup DIR PORT [extra main.cf lines...]   write main.cf/master.cf, create queue/data dirs
#   pf_start DIR / pf_stop DIR / pf_queue_count DIR / pf_conf DIR key=value...

pf_setup() {
    local dir=$1 port=$2
    shift 2
    mkdir -p "$dir/etc" "$dir/queue" "$dir/data"
    chmod 755 "$dir" "$dir/etc"
    chown root:root "$dir/queue"
    chown postfix:postfix "$dir/data"
    cat >"$dir/etc/main.cf" <<MAIN
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = pf-bench.localdomain
mydomain = localdomain
myorigin = \$myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
smtpd_helo_required = no
smtpd_banner = \$myhostname ESMTP
message_size_limit = 36700160
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
anvil_rate_time_unit = 60s
biff = no
append_dot_mydomain = no
alias_maps =
alias_database =
local_recipient_maps =
notify_classes =
maillog_file_prefixes = $dir
maillog_file = $dir/maillog
$(printf '%s\n' "$@")
MAIN
    cat >"$dir/etc/master.cf" <<MASTER
127.0.0.1:$port inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
MASTER
}

pf_start() { script -qc "postfix -c $1/etc start" /dev/null >>"$1/control.log" 2>&1; }
pf_stop() { postfix -c "$1/etc" stop >>"$1/control.log" 2>&1 || true; }
pf_conf() {
    local dir=$1
    shift
    postconf -c "$dir/etc" -e "$@"
}
# Messages still in the queue (every queue file, whatever its state).
pf_queue_count() {
    find "$1/queue/incoming" "$1/queue/active" "$1/queue/deferred" "$1/queue/maildrop" \
        "$1/queue/hold" -type f 2>/dev/null | wc -l
}
