#!/usr/bin/env bash
# Benchmarks: smtp-oauth-relay against a private Postfix instance on this machine (loopback only).
#
#   bench/run.sh            full run (about 10-15 minutes on 2 cores); writes BENCHMARKS.md (with
#                           PARTS=subset: only bench/results/last-PARTS.jsonl and the table on stdout)
#   bench/run.sh --smoke    seconds; tiny counts, checks the harness end to end; writes nothing
#                           outside its temporary directory (the table goes to stdout)
#
# Environment: REPEATS (default 3; smoke 1), BENCH_PORT_BASE (default 23500),
#   BENCH_TMP (parent of the scratch directory; default /var/tmp, same filesystem as /work here),
#   KEEP=1 keeps the scratch directory, NO_BUILD=1 skips `cargo build --release`,
#   RELAY_BIN=PATH measures that binary instead (e.g. another commit's build; implies NO_BUILD),
#   PARTS (default "disk accept drain mem delivery routes postgres"): the parts to run, e.g.
#   PARTS="accept delivery" for the accept rate and the delivery memory of one binary in one run,
#   ACCEPT_CONFIGS (SIZE:SESSIONS:MESSAGES:LATENCY_MESSAGES ...) replaces the accept runs' counts,
#   PG_CONFIGS (SIZE:SESSIONS:MESSAGES ...) the postgres part's accept runs, PG_DRAIN_N its drain
#   count, PG_DRAINS (RATE:CONNECTIONS ..., e.g. "50/s:3 1000/s:3") its drain rows (1 and 2 replicas each).
# Needs (root): postfix 3.x (smtp-source, postfix, postsuper, postqueue), python3, openssl;
#   the postgres part: PostgreSQL (initdb, pg_ctl, psql; Debian's postgresql) and no Postfix.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=full
for arg in "$@"; do
    case $arg in
    --smoke) MODE=smoke ;;
    *) echo "usage: bench/run.sh [--smoke]" >&2; exit 2 ;;
    esac
done
if [ "$MODE" = smoke ]; then REPEATS=${REPEATS:-1}; else REPEATS=${REPEATS:-3}; fi
PB=${BENCH_PORT_BASE:-23500}
P_RELAY=$((PB + 25)) P_PF=$((PB + 26)) P_PFD=$((PB + 27)) P_SINK=$((PB + 28)) P_CLOSED=$((PB + 29))
P_PG=$((PB + 30)) P_RELAY2=$((PB + 31))
BIN=${RELAY_BIN:-$ROOT/target/release/smtp-oauth-relay}
[ -n "${RELAY_BIN:-}" ] && NO_BUILD=1
ALL_PARTS="disk accept drain mem delivery routes postgres"
PARTS=" ${PARTS:-$ALL_PARTS} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
B=$ROOT/bench
# shellcheck source=bench/postfix.sh
source "$B/postfix.sh"

if [ -z "${NO_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
fi
[ -x "$BIN" ] || { echo "missing $BIN" >&2; exit 1; }

W=$(mktemp -d "${BENCH_TMP:-/var/tmp}/relay-bench.XXXXXX")
chmod 755 "$W"
RES=$W/results.jsonl
: >"$RES"
PIDS=()
PF_DIRS=()
CGROUPS=()
PG_DIR=
AS_PG=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for d in "${PF_DIRS[@]}"; do pf_stop "$d"; done
    if [ -n "$PG_DIR" ]; then
        "${AS_PG[@]}" pg_ctl -D "$PG_DIR/data" -m fast -w -t 30 stop >/dev/null 2>&1
        rm -rf "$PG_DIR"
    fi
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    for c in "${CGROUPS[@]}"; do rmdir "$c" 2>/dev/null; done
    if [ -n "${KEEP:-}" ]; then echo "scratch kept in $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2 || true; }
now() { date +%s.%N; }
record() { echo "$1" >>"$RES"; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.4f}')" "$1" "$2"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
# CPU seconds (user + system, all threads) of a live process.
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{printf "%.3f", ($14+$15)/t}' "/proc/$1/stat"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

for p in $P_RELAY $P_PF $P_PFD $P_SINK $P_CLOSED $P_PG $P_RELAY2; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        echo "port $p is in use; set BENCH_PORT_BASE" >&2
        exit 1
    fi
done

record "{\"kind\":\"machine\",\"mode\":\"$MODE\",\"nproc\":$(nproc),\"kernel\":\"$(uname -r)\",\"fs\":\"$(df -T "$W" | awk 'NR==2 {print $2" on "$1}')\",\"load_start\":\"$(load)\",\"started\":\"$(date -u +%FT%TZ)\",\"commit\":\"$(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet HEAD -- src || echo +dirty)\"}"

# ---------------------------------------------------------------- relay helpers
relay_conf() { # FILE SPOOL [extra TOML]
    cat >"$1" <<EOF
[smtp]
listen = ["127.0.0.1:$P_RELAY"]
hostname = "relay-bench.localdomain"
max_connections = 1100
[queue]
dir = "$2"
[log]
level = "info"
${3:-}
EOF
}
RELAY_PID=
STARTUP_S=
relay_start() { # CONFIG LOG [PORT]
    local out
    out=$(python3 "$B/startup.py" --port "${3:-$P_RELAY}" --log "$2" --timeout 60 -- "$BIN" --config "$1" serve) || {
        echo "relay did not start: $out" >&2
        tail -20 "$2" >&2
        exit 1
    }
    RELAY_PID=${out% *}
    STARTUP_S=${out#* }
    PIDS+=("$RELAY_PID")
}
relay_stop() {
    [ -n "$RELAY_PID" ] || return 0
    kill -TERM "$RELAY_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$RELAY_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$RELAY_PID" 2>/dev/null || true
    RELAY_PID=
}
count_files() { find "$1" -maxdepth 1 -type f -name '*.msg' | wc -l; }

source_run() { # PORT SESSIONS COUNT SIZE -> seconds
    local t0 t1
    t0=$(now)
    smtp-source -d -s "$2" -m "$3" -l "$4" -f bench@legacy.test -t rcpt@example.org "127.0.0.1:$1" \
        >>"$W/smtp-source.log" 2>&1 || log "smtp-source reported errors (see $W/smtp-source.log)"
    t1=$(now)
    secs "$t0" "$t1"
}

# ---------------------------------------------------------------- 0. disk limit
if part disk; then
log "disk limit: write + fsync + rename + dir fsync (load $(load))"
if [ "$MODE" = smoke ]; then DN1=100 DN16=200; else DN1=1000 DN16=3000; fi
for rep in $(seq 1 "$REPEATS"); do
    for wr in 1 16; do
        n=$DN1
        [ "$wr" = 16 ] && n=$DN16
        r=$(python3 "$B/fsync_limit.py" --dir "$W/fsync" --writers "$wr" --messages "$n" --size 10240)
        record "{\"kind\":\"disk\",\"rep\":$rep,\"load\":\"$(load)\",${r#\{}"
    done
done
fi

# ---------------------------------------------------------------- 1. accept path
if part accept; then
log "accept path: relay on :$P_RELAY, postfix on :$P_PF"
ACC_SPOOL=$W/accept-spool
relay_conf "$W/accept.toml" "$ACC_SPOOL"
relay_start "$W/accept.toml" "$W/relay-accept.log"
PF=$W/pf-accept
mkdir -p "$PF"
PF_DIRS+=("$PF")
# Postfix only accepts: every message is put on hold (no delivery work at all after the 250).
pf_setup "$PF" "$P_PF" "smtpd_client_restrictions = check_client_access static:HOLD"
pf_start "$PF"
python3 - "$P_PF" <<'EOF'
import socket, sys, time
for _ in range(500):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close(); break
    except OSError: time.sleep(0.02)
EOF
clear_relay() { find "$ACC_SPOOL/queue" -maxdepth 1 -type f -delete; }
clear_pf() { postsuper -c "$PF/etc" -d ALL >/dev/null 2>&1 || true; }

if [ "$MODE" = smoke ]; then
    CONFIGS="10240:16:300:100"
else
    CONFIGS="10240:16:5000:2000 10240:64:5000:2000 1048576:16:200:100 1048576:64:200:100"
fi
CONFIGS=${ACCEPT_CONFIGS:-$CONFIGS}
for rep in $(seq 1 "$REPEATS"); do
    for c in $CONFIGS; do
        IFS=: read -r size sess n nlat <<<"$c"
        for target in relay postfix; do
            if [ $target = relay ]; then port=$P_RELAY; else port=$P_PF; fi
            clear_relay
            clear_pf
            sync
            l=$(load)
            s=$(source_run "$port" "$sess" "$n" "$size")
            if [ $target = relay ]; then stored=$(count_files "$ACC_SPOOL/queue"); else stored=$(pf_queue_count "$PF"); fi
            clear_relay
            clear_pf
            sync
            lat=$(python3 "$B/acklat.py" --port "$port" --sessions "$sess" --messages "$nlat" --size "$size") || true
            [ -n "$lat" ] || lat='{"errors":1}'
            record "{\"kind\":\"accept\",\"target\":\"$target\",\"size\":$size,\"sessions\":$sess,\"rep\":$rep,\"messages\":$n,\"stored\":$stored,\"seconds\":$s,\"load\":\"$l\",\"lat\":$lat}"
            log "accept $target size=$size sessions=$sess rep=$rep: $n in ${s}s (stored $stored); latency $lat"
        done
    done
done
clear_relay
clear_pf
relay_stop
pf_stop "$PF"
fi

# ---------------------------------------------------------------- the simulator (token endpoint, Exchange)
# The simulator provides the real token endpoint (and, for the relay rows that deliver to it, the
# XOAUTH2-validating Exchange endpoint) with its limits raised. Its own process: the relay's RSS is
# the relay's alone.
SIM_PID=
sim_start() {
    [ -z "$SIM_PID" ] || return 0
    cat >"$W/sim.toml" <<EOF
state_dir = "$W/sim-state"
[smtp]
connections_per_mailbox = 64
messages_per_window = 10000000
rate_window = "60s"
recipients_per_day = 10000000
EOF
    "$BIN" simulate --config "$W/sim.toml" >"$W/sim.out" 2>"$W/sim.err" &
    SIM_PID=$!
    PIDS+=("$SIM_PID")
    for _ in $(seq 1 200); do grep -q '^# --- end ---' "$W/sim.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^# --- end ---' "$W/sim.out" || { echo "simulator did not start" >&2; cat "$W/sim.err" >&2; exit 1; }
    sed -n '/^# --- relay.toml fragment ---/,/^# --- end ---/p' "$W/sim.out" >"$W/sim-fragment.toml"
    OAUTH=$(sed -n '/^\[oauth\]/,/^# --- end ---/p' "$W/sim-fragment.toml" | grep -v '^#')
    MAILBOX=$(sed -n 's/^mail_account = //p' "$W/sim-fragment.toml")
    SIM_UP=$(sed -n '/^\[upstream\]/,/^\[oauth\]/p' "$W/sim-fragment.toml" | grep -v '^\[oauth\]')
    SIM_MAILDIR=$(sed -n 's/^Mailbox directory: *//p' "$W/sim.out")
}
if part drain || part mem || part delivery || part postgres; then sim_start; fi

# ---------------------------------------------------------------- 2. drain path
if part drain; then
log "drain path: TLS sink on :$P_SINK"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
    -keyout "$W/ca.key" -out "$W/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$W/sink.key" -out "$W/sink.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$W/sink.ext"
openssl x509 -req -in "$W/sink.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial -days 2 \
    -extfile "$W/sink.ext" -out "$W/sink.pem" 2>/dev/null
python3 "$B/tls_sink.py" --port "$P_SINK" --cert "$W/sink.pem" --key "$W/sink.key" --count-file "$W/sink.count" \
    >"$W/sink.log" 2>&1 &
SINK_PID=$!
PIDS+=("$SINK_PID")

for _ in $(seq 1 100); do [ -s "$W/sink.count" ] && break; sleep 0.1; done
sink_count() { cat "$W/sink.count" 2>/dev/null || echo 0; }

if [ "$MODE" = smoke ]; then ND=${DRAIN_N:-300}; else ND=${DRAIN_N:-10000}; fi
# The relay's ceilings since the config bounds (issue 11): 3 sessions per mailbox (Exchange's
# limit) and 1000 messages/s; Postfix gets the same concurrency for a like-for-like drain.
DRAIN_CONNS=3
drain_relay() { # LABEL UPSTREAM_TOML
    local label=$1 up=$2 spool=$W/drain-spool-$1 t0 t1 left c0 c1 s cpu sink0 sink1 l
    rm -rf "$spool"
    relay_conf "$W/fill.toml" "$spool"
    relay_start "$W/fill.toml" "$W/relay-fill.log"
    source_run "$P_RELAY" 16 "$ND" 10240 >/dev/null
    relay_stop
    local queued
    queued=$(count_files "$spool/queue")
    relay_conf "$W/drain-$label.toml" "$spool" "$up
connections = $DRAIN_CONNS
rate = \"1000/s\"
$OAUTH"
    sync
    sink0=$(sink_count)
    l=$(load)
    t0=$(now)
    relay_start "$W/drain-$label.toml" "$W/relay-drain-$label.log"
    if [ -n "${PERF_DRAIN:-}" ] && [ "$label" = sink ]; then
        # Profile the relay while it drains (bench/README.md, "Profiling").
        perf record -e cpu-clock -F 999 -g -p "$RELAY_PID" -o "$PERF_DRAIN" -- sleep "${PERF_SECS:-5}" \
            >"$W/perf.log" 2>&1 &
    fi
    left=$queued
    for _ in $(seq 1 6000); do # at most 600 s
        left=$(count_files "$spool/queue")
        [ "$left" -eq 0 ] && break
        sleep 0.1
    done
    t1=$(now)
    sleep 0.5 # the sink publishes its count every 0.2 s
    cpu=$(cpu_of "$RELAY_PID")
    rss=$(hwm_kb "$RELAY_PID")
    sink1=$(sink_count)
    listed=$("$BIN" --config "$W/drain-$label.toml" queue list 2>/dev/null | grep -c . || true)
    relay_stop
    s=$(secs "$t0" "$t1")
    record "{\"kind\":\"drain\",\"target\":\"$label\",\"queued\":$queued,\"left\":$left,\"listed_after\":$listed,\"sink_delta\":$((sink1 - sink0)),\"seconds\":$s,\"cpu_s\":$cpu,\"peak_rss_kb\":$rss,\"load\":\"$l\"}"
    log "drain $label: $queued queued, $left left after ${s}s, cpu ${cpu}s, sink +$((sink1 - sink0))"
}

drain_postfix() {
    local pf=$W/pf-drain queued t0 t1 left s cg cpu sink0 sink1 l
    mkdir -p "$pf"
    PF_DIRS+=("$pf")
    pf_setup "$pf" "$P_PFD" \
        "smtpd_client_restrictions = check_client_access static:HOLD" \
        "relayhost = [127.0.0.1]:$P_SINK" \
        "smtp_tls_security_level = encrypt" \
        "smtp_tls_connection_reuse = yes" \
        "smtp_tls_session_cache_database = btree:\${data_directory}/smtp_scache" \
        "default_destination_concurrency_limit = $DRAIN_CONNS" \
        "initial_destination_concurrency = $DRAIN_CONNS" \
        "smtp_destination_concurrency_limit = $DRAIN_CONNS" \
        "relay_destination_concurrency_limit = $DRAIN_CONNS"
    echo "tlsproxy  unix  -       -       n       -       0       tlsproxy" >>"$pf/etc/master.cf"
    pf_start "$pf"
    python3 -c "
import socket, time
for _ in range(500):
    try: socket.create_connection(('127.0.0.1', $P_PFD), 0.5).close(); break
    except OSError: time.sleep(0.02)"
    source_run "$P_PFD" 16 "$ND" 10240 >/dev/null
    queued=$(pf_queue_count "$pf")
    pf_stop "$pf"
    sleep 1
    # Postfix is many processes: account them all with a cpuacct cgroup joined before start.
    cg=/sys/fs/cgroup/cpuacct/relay-bench-$$
    mkdir -p "$cg"
    CGROUPS+=("$cg")
    sync
    sink0=$(sink_count)
    l=$(load)
    t0=$(now)
    (
        echo "$BASHPID" >"$cg/cgroup.procs"
        pf_start "$pf"
        postsuper -c "$pf/etc" -H ALL >/dev/null 2>&1
        postqueue -c "$pf/etc" -f
    )
    left=$queued
    for _ in $(seq 1 6000); do
        left=$(pf_queue_count "$pf")
        [ "$left" -eq 0 ] && break
        sleep 0.1
    done
    t1=$(now)
    sleep 0.5
    cpu=$(awk '{printf "%.3f", $1/1e9}' "$cg/cpuacct.usage")
    sink1=$(sink_count)
    pf_stop "$pf"
    s=$(secs "$t0" "$t1")
    record "{\"kind\":\"drain\",\"target\":\"postfix\",\"queued\":$queued,\"left\":$left,\"sink_delta\":$((sink1 - sink0)),\"seconds\":$s,\"cpu_s\":$cpu,\"load\":\"$l\"}"
    log "drain postfix: $queued queued, $left left after ${s}s, cpu ${cpu}s, sink +$((sink1 - sink0))"
}

SINK_UP="[upstream]
host = \"127.0.0.1\"
port = $P_SINK
tls = \"starttls\"
ca_file = \"$W/ca.pem\"
tls_server_name = \"localhost\"
mail_account = $MAILBOX
from = $MAILBOX"
drain_relay sink "$SINK_UP"
drain_postfix
if [ "$MODE" = full ]; then
    drain_relay simulator "$SIM_UP"
fi
SINK_CPU=$(cpu_of "$SINK_PID")
record "{\"kind\":\"sink\",\"cpu_s\":$SINK_CPU,\"messages\":$(sink_count)}"
fi

# ---------------------------------------------------------------- 3. memory and scale
if part mem; then
log "memory and scale"
MS=$W/mem-spool
relay_conf "$W/mem.toml" "$MS"
relay_start "$W/mem.toml" "$W/relay-mem.log"
sleep 1
idle=$(rss_kb "$RELAY_PID")
python3 "$B/idle_conns.py" --port "$P_RELAY" -n 1000 --hold 120 >"$W/idle.out" 2>&1 &
IDLE_PID=$!
PIDS+=("$IDLE_PID")
for _ in $(seq 1 600); do grep -q ready "$W/idle.out" && break; sleep 0.1; done
ready=$(head -1 "$W/idle.out")
sleep 0.5
sess=$(rss_kb "$RELAY_PID")
kill -TERM "$IDLE_PID" 2>/dev/null || true
wait "$IDLE_PID" 2>/dev/null || true
record "{\"kind\":\"mem\",\"idle_rss_kb\":$idle,\"sessions_1000_rss_kb\":$sess,\"sessions\":\"$ready\",\"startup_s\":$STARTUP_S}"
log "idle RSS ${idle} kB; with 1000 sessions ($ready) ${sess} kB"
relay_stop

# Queued scale: the deliverer runs (token from the simulator) but its upstream refuses connections,
# so the queue stays (a few messages get a retry state) and the scheduler indexes every message.
if [ "$MODE" = smoke ]; then SIZES="0 1000"; else SIZES="0 10000 100000"; fi
SCALE_UP="[upstream]
host = \"127.0.0.1\"
port = $P_CLOSED
tls = \"starttls\"
mail_account = $MAILBOX
$OAUTH"
for n in $SIZES; do
    rm -rf "$MS"
    if [ "$n" -gt 0 ]; then
        t0=$(now)
        python3 "$B/gen_spool.py" --spool "$MS" --count "$n" --size 1024
        log "generated $n spool files in $(secs "$t0" "$(now)")s"
    fi
    relay_conf "$W/scale.toml" "$MS" "$SCALE_UP"
    sync
    l=$(load)
    relay_start "$W/scale.toml" "$W/relay-scale-$n.log"
    st=$STARTUP_S
    # The scheduler's first scan reads the whole queue after the port opens: wait for it.
    if [ "$MODE" = smoke ]; then sleep 1; else sleep 3; fi
    rss=$(rss_kb "$RELAY_PID")
    hwm=$(hwm_kb "$RELAY_PID")
    t0=$(now)
    lines=$("$BIN" --config "$W/scale.toml" queue list | wc -l)
    t1=$(now)
    ql=$(secs "$t0" "$t1")
    relay_stop
    record "{\"kind\":\"scale\",\"queued\":$n,\"startup_s\":$st,\"rss_kb\":$rss,\"hwm_kb\":$hwm,\"list_s\":$ql,\"list_lines\":$lines,\"load\":\"$l\"}"
    log "scale $n: start-up ${st}s, RSS ${rss} kB (peak ${hwm}), queue list ${ql}s ($lines lines)"
done
fi

# ---------------------------------------------------------------- 4. delivery memory
# Large messages delivered at once: 4 x 34 MiB (just under the 35 MiB default limit), From foreign
# to the mailbox so the sender policy rewrites it, to the simulator (its own process). They are
# generated held, the relay starts idle, its idle RSS is read and its peak reset (clear_refs 5),
# then all four are released at once; the figure is the peak RSS above idle until the spool is
# empty (upstream.connections is at most 3: three are in flight at once, the fourth follows).
if part delivery; then
log "delivery memory"
DS=$W/deliver-spool
DM_N=${DELIVERY_N:-4}
DM_SIZE=${DELIVERY_SIZE:-$((34 << 20))}
rm -rf "$DS"
python3 "$B/gen_spool.py" --spool "$DS" --count "$DM_N" --size "$DM_SIZE" --state held
relay_conf "$W/deliver.toml" "$DS" "$SIM_UP
connections = 3
rate = \"1000/s\"
$OAUTH"
sync
eml0=$(find "$SIM_MAILDIR" -name '*.eml' 2>/dev/null | wc -l)
relay_start "$W/deliver.toml" "$W/relay-deliver.log"
sleep 2
idle=$(rss_kb "$RELAY_PID")
# Reset VmHWM to the current RSS, so the peak below is the delivery's (Linux >= 4.0).
hwm_reset=true
echo 5 >"/proc/$RELAY_PID/clear_refs" 2>/dev/null || hwm_reset=false
l=$(load)
t0=$(now)
REL_PIDS=()
for f in "$DS"/held/*.msg; do
    id=$(basename "$f" .msg)
    "$BIN" --config "$W/deliver.toml" queue release "$id" >/dev/null 2>&1 &
    REL_PIDS+=($!)
done
wait_left=0
peak_sampled=0
for _ in $(seq 1 6000); do # at most 600 s
    r=$(rss_kb "$RELAY_PID" 2>/dev/null || echo 0)
    [ "$r" -gt "$peak_sampled" ] && peak_sampled=$r
    wait_left=$(($(count_files "$DS/queue") + $(count_files "$DS/held")))
    [ "$wait_left" -eq 0 ] && break
    sleep 0.1
done
t1=$(now)
wait "${REL_PIDS[@]}" 2>/dev/null || true
peak=$(hwm_kb "$RELAY_PID")
failed=$(count_files "$DS/failed")
eml1=$(find "$SIM_MAILDIR" -name '*.eml' 2>/dev/null | wc -l)
relay_stop
s=$(secs "$t0" "$t1")
record "{\"kind\":\"delivery_mem\",\"store\":\"files\",\"messages\":$DM_N,\"size\":$DM_SIZE,\"idle_rss_kb\":$idle,\"peak_rss_kb\":$peak,\"peak_sampled_kb\":$peak_sampled,\"hwm_reset\":$hwm_reset,\"above_idle_kb\":$((peak - idle)),\"left\":$wait_left,\"failed\":$failed,\"delivered_to_sim\":$((eml1 - eml0)),\"seconds\":$s,\"load\":\"$l\"}"
log "delivery memory: $DM_N x $DM_SIZE bytes, idle RSS ${idle} kB, peak ${peak} kB (+$((peak - idle)) kB), ${s}s, left $wait_left, failed $failed, simulator got $((eml1 - eml0))"
fi

if part routes; then
    # 1 route, 50 routes x 1 mailbox, 1 template route x 500 mailboxes: one simulator, a relay
    # process each (bench/routes.py prints its own table too).
    if [ "$MODE" = smoke ]; then RT_N=100; else RT_N=${ROUTES_MESSAGES:-2000}; fi
    log "routes: $RT_N messages per scenario"
    BENCH_TMP=$W python3 "$B/routes.py" --bin "$BIN" --messages "$RT_N" >"$W/routes.out"
    grep '^{' "$W/routes.out" | sed 's/^{/{"kind":"routes",/' >>"$RES"
    grep -v '^{' "$W/routes.out" >&2
fi

# ---------------------------------------------------------------- 6. PostgreSQL store
# A throwaway PostgreSQL cluster in the scratch directory (fsync = on: a 250 means committed, as
# the file spool's 250 means fsynced). Accept: bench/acklat.py (persistent sessions; rate and
# final dot -> 250 latency from the same run) against the relay with no upstream, file store and
# PostgreSQL store alternating, same counts. Drain: messages queued in the database, then 1 or 2
# relay processes on it deliver to the simulator under one shared upstream.rate/connections.
if part postgres; then
PG_DIR=$W/pg
mkdir -p "$PG_DIR"
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PG_DIR"
    AS_PG=(runuser -u postgres --)
fi
log "postgres: throwaway cluster on 127.0.0.1:$P_PG (fsync on)"
timeout 120 "${AS_PG[@]}" initdb -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 \
    >"$PG_DIR/initdb.log" 2>&1 || { echo "initdb failed: $(tail -n 5 "$PG_DIR/initdb.log")" >&2; exit 1; }
timeout 120 "${AS_PG[@]}" pg_ctl -D "$PG_DIR/data" -l "$PG_DIR/data/server.log" -w -t 60 \
    -o "-p $P_PG -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c max_connections=200" \
    start >/dev/null || { echo "PostgreSQL did not start: $(tail -n 5 "$PG_DIR/data/server.log")" >&2; exit 1; }
pg_sql() { # DB SQL
    PGOPTIONS="-c client_min_messages=warning" psql -h 127.0.0.1 -p "$P_PG" -U postgres -d "$1" -Atq \
        -v ON_ERROR_STOP=1 -c "$2"
}
pg_url() { echo "postgres://postgres@127.0.0.1:$P_PG/$1?sslmode=disable"; }
pg_fresh() { # DB: an empty database (the relay applies its schema)
    pg_sql postgres "DROP DATABASE IF EXISTS $1" >/dev/null
    pg_sql postgres "CREATE DATABASE $1" >/dev/null
}
PG_VERSION=$(pg_sql postgres "SHOW server_version")
PG_FSYNC=$(pg_sql postgres "SHOW fsync")
PG_SYNC=$(pg_sql postgres "SHOW synchronous_commit")
PG_WAL_SYNC=$(pg_sql postgres "SHOW wal_sync_method")
record "{\"kind\":\"pg_server\",\"version\":\"$PG_VERSION\",\"fsync\":\"$PG_FSYNC\",\"synchronous_commit\":\"$PG_SYNC\",\"wal_sync_method\":\"$PG_WAL_SYNC\",\"data_fs\":\"$(df -T "$PG_DIR" | awk 'NR==2 {print $2" on "$1}')\"}"
pg_conf() { # FILE PORT DB [extra TOML after [queue]]
    cat >"$1" <<EOT
[smtp]
listen = ["127.0.0.1:$2"]
hostname = "relay-bench.localdomain"
max_connections = 1100
[queue]
backend = "postgres"
url = "$(pg_url "$3")"
dir = "$W/pg-relay-dir-$2"
lease = "30s"
[log]
level = "info"
${4:-}
EOT
}
stop_pid() { # PID: TERM, wait (bounded), KILL
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
}

# --- accept: file store vs PostgreSQL store, alternating
if [ "$MODE" = smoke ]; then PGC="10240:16:200"; else PGC="10240:16:2000 10240:64:2000 1048576:16:100"; fi
PGC=${PG_CONFIGS:-$PGC}
FS_SPOOL=$W/pgcmp-spool
relay_conf "$W/pgcmp-file.toml" "$FS_SPOOL"
pg_fresh accept
pg_conf "$W/pgcmp-pg.toml" "$P_RELAY2" accept
relay_start "$W/pgcmp-file.toml" "$W/relay-pgcmp-file.log"
FILE_PID=$RELAY_PID
relay_start "$W/pgcmp-pg.toml" "$W/relay-pgcmp-pg.log" "$P_RELAY2"
PGR_PID=$RELAY_PID
RELAY_PID=
# Warm-up, the same for both: the PostgreSQL store connects (and applies its schema) at its
# first message; 16 sessions x 4 messages open its pool's connections before the timed runs.
for port in $P_RELAY $P_RELAY2; do
    python3 "$B/acklat.py" --port "$port" --sessions 16 --messages 64 --size 10240 >/dev/null || true
done
for rep in $(seq 1 "$REPEATS"); do
    for c in $PGC; do
        IFS=: read -r size sess n <<<"$c"
        for store in file postgres; do
            if [ $store = file ]; then
                port=$P_RELAY
                find "$FS_SPOOL/queue" -maxdepth 1 -type f -delete
                sync
            else
                port=$P_RELAY2
                pg_sql accept "TRUNCATE relay_body, relay_message" >/dev/null
                pg_sql accept "CHECKPOINT" >/dev/null
                sync
            fi
            l=$(load)
            r=$(python3 "$B/acklat.py" --port "$port" --sessions "$sess" --messages "$n" --size "$size") || true
            [ -n "$r" ] || r='{"errors":1}'
            if [ $store = file ]; then stored=$(count_files "$FS_SPOOL/queue"); else stored=$(pg_sql accept "SELECT count(*) FROM relay_message"); fi
            record "{\"kind\":\"pg_accept\",\"store\":\"$store\",\"size\":$size,\"sessions\":$sess,\"rep\":$rep,\"messages\":$n,\"stored\":$stored,\"load\":\"$l\",\"lat\":$r}"
            log "accept $store size=$size sessions=$sess rep=$rep: stored $stored of $n; $r"
        done
    done
done
stop_pid "$FILE_PID"
stop_pid "$PGR_PID"
find "$FS_SPOOL/queue" -maxdepth 1 -type f -delete

# --- drain: N queued in the database, 1 or 2 replicas deliver to the simulator
if [ "$MODE" = smoke ]; then PDN=${PG_DRAIN_N:-100}; else PDN=${PG_DRAIN_N:-600}; fi
# RATE:CONNECTIONS of each drain row (each with 1, then 2 replicas).
if [ "$MODE" = smoke ]; then PGD="50/s:3"; else PGD="50/s:3 1000/s:3"; fi
PGD=${PG_DRAINS:-$PGD}
SIM_PORT=$(sed -n 's/^SMTP port: *//p' "$W/sim.out")
pg_drain() { # RATE CONNECTIONS REPLICAS
    local rate=$1 conns=$2 reps=$3 db t0 l r pids=() queued i port
    db=drain_$((RANDOM))
    pg_fresh "$db"
    pg_conf "$W/pgfill.toml" "$P_RELAY2" "$db"
    relay_start "$W/pgfill.toml" "$W/relay-pgfill.log" "$P_RELAY2"
    python3 "$B/acklat.py" --port "$P_RELAY2" --sessions 16 --messages "$PDN" --size 10240 >/dev/null || true
    relay_stop
    queued=$(pg_sql "$db" "SELECT count(*) FROM relay_message WHERE state = 'queued'")
    pg_sql "$db" "CHECKPOINT" >/dev/null
    sync
    l=$(load)
    t0=$(now)
    for i in $(seq 1 "$reps"); do
        port=$P_RELAY
        [ "$i" = 2 ] && port=$P_RELAY2
        pg_conf "$W/pgdrain-$i.toml" "$port" "$db" "$SIM_UP
connections = $conns
rate = \"$rate\"
$OAUTH"
        relay_start "$W/pgdrain-$i.toml" "$W/relay-pgdrain-$db-$i.log" "$port"
        pids+=("$RELAY_PID")
    done
    RELAY_PID=
    r=$(python3 "$B/pg_drain_watch.py" --psql "psql -h 127.0.0.1 -p $P_PG -U postgres -d $db" --t0 "$t0" \
        --maildir "$SIM_MAILDIR" --sim-port "$SIM_PORT" --timeout 600)
    local cpu="" p
    for p in "${pids[@]}"; do cpu="$cpu${cpu:+,}$(cpu_of "$p")"; done
    for p in "${pids[@]}"; do stop_pid "$p"; done
    local dup per=""
    dup=$(cat "$W"/relay-pgdrain-"$db"-*.log | grep -c 'possible duplicate' || true)
    for i in $(seq 1 "$reps"); do
        per="$per${per:+,}$(grep -c 'delivered id=' "$W/relay-pgdrain-$db-$i.log" || true)"
    done
    record "{\"kind\":\"pg_drain\",\"rate\":\"$rate\",\"connections\":$conns,\"replicas\":$reps,\"queued\":$queued,\"cpu_s\":[$cpu],\"possible_duplicates\":$dup,\"per_replica\":[$per],\"load\":\"$l\",\"watch\":$r}"
    log "pg drain rate=$rate connections=$conns replicas=$reps: $queued queued; $r; relay CPU s $cpu"
    pg_sql postgres "DROP DATABASE $db" >/dev/null
}
for d in $PGD; do
    for reps in 1 2; do
        pg_drain "${d%:*}" "${d##*:}" "$reps"
    done
done

# --- delivery memory from the database: as part 4 for the file spool (4 x 34 MiB, From foreign,
# connections = 3, released at once after the idle RSS is read and the peak reset), the messages
# accepted into the database by a relay with no upstream and held with `queue hold`.
PM_N=${DELIVERY_N:-4}
if [ "$MODE" = smoke ]; then PM_SIZE=${DELIVERY_SIZE:-$((2 << 20))}; else PM_SIZE=${DELIVERY_SIZE:-$((34 << 20))}; fi
pg_fresh deliver_mem
pg_conf "$W/pgmem-fill.toml" "$P_RELAY2" deliver_mem
relay_start "$W/pgmem-fill.toml" "$W/relay-pgmem-fill.log" "$P_RELAY2"
python3 "$B/acklat.py" --port "$P_RELAY2" --sessions "$PM_N" --messages "$PM_N" --size "$PM_SIZE" >/dev/null || true
relay_stop
pg_conf "$W/pgmem.toml" "$P_RELAY" deliver_mem "$SIM_UP
connections = 3
rate = \"1000/s\"
$OAUTH"
PM_IDS=$(pg_sql deliver_mem "SELECT id FROM relay_message WHERE state = 'queued' ORDER BY id")
for id in $PM_IDS; do "$BIN" --config "$W/pgmem.toml" queue hold "$id" >/dev/null; done
eml0=$(find "$SIM_MAILDIR" -name '*.eml' 2>/dev/null | wc -l)
relay_start "$W/pgmem.toml" "$W/relay-pgmem.log" "$P_RELAY"
sleep 2
idle=$(rss_kb "$RELAY_PID")
hwm_reset=true
echo 5 >"/proc/$RELAY_PID/clear_refs" 2>/dev/null || hwm_reset=false
l=$(load)
t0=$(now)
REL_PIDS=()
for id in $PM_IDS; do
    "$BIN" --config "$W/pgmem.toml" queue release "$id" >/dev/null &
    REL_PIDS+=($!)
done
left=$PM_N
for _ in $(seq 1 6000); do # at most 600 s
    left=$(pg_sql deliver_mem "SELECT count(*) FROM relay_message WHERE state <> 'failed'")
    [ "$left" -eq 0 ] && break
    sleep 0.1
done
t1=$(now)
wait "${REL_PIDS[@]}" 2>/dev/null || true
peak=$(hwm_kb "$RELAY_PID")
failed=$(pg_sql deliver_mem "SELECT count(*) FROM relay_message WHERE state = 'failed'")
eml1=$(find "$SIM_MAILDIR" -name '*.eml' 2>/dev/null | wc -l)
relay_stop
s=$(secs "$t0" "$t1")
record "{\"kind\":\"delivery_mem\",\"store\":\"postgres\",\"messages\":$PM_N,\"size\":$PM_SIZE,\"idle_rss_kb\":$idle,\"peak_rss_kb\":$peak,\"hwm_reset\":$hwm_reset,\"above_idle_kb\":$((peak - idle)),\"left\":$left,\"failed\":$failed,\"delivered_to_sim\":$((eml1 - eml0)),\"seconds\":$s,\"load\":\"$l\"}"
log "delivery memory (PostgreSQL): $PM_N x $PM_SIZE bytes, idle RSS ${idle} kB, peak ${peak} kB (+$((peak - idle)) kB), ${s}s, left $left, failed $failed, simulator got $((eml1 - eml0))"
pg_sql postgres "DROP DATABASE deliver_mem" >/dev/null
fi

record "{\"kind\":\"end\",\"load_end\":\"$(load)\",\"finished\":\"$(date -u +%FT%TZ)\"}"
cp "$RES" "$W/../relay-bench-last-results.jsonl" 2>/dev/null || true
if [ "$MODE" = full ] && [ "$PARTS" = " $ALL_PARTS " ]; then
    python3 "$B/report.py" "$RES" --out "$ROOT/BENCHMARKS.md" --raw "$ROOT/bench/results/last.jsonl"
elif [ "$MODE" = full ]; then
    # A subset of the parts: BENCHMARKS.md (every part) stays; the raw results of this run go
    # beside it, named after the parts.
    sub=$(echo $PARTS | tr ' ' '-')
    python3 "$B/report.py" "$RES" --raw "$ROOT/bench/results/last-$sub.jsonl"
else
    python3 "$B/report.py" "$RES"
fi
