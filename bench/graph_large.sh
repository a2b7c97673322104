#!/usr/bin/env bash
# Graph large messages (upstream.graph_large_messages): the relay's peak RSS while a 30 MiB
# message (two base64 attachments of 11 MiB) goes through a Graph draft and upload sessions,
# with the simulator (`smtp-oauth-relay simulate`, app roles Mail.Send + Mail.ReadWrite) as its
# own process, so VmHWM is the relay's alone. Then Graph deliveries per second (bench/graph.sh).
# Loopback only.
#
#   bench/graph_large.sh [COUNT]   COUNT for bench/graph.sh (default 1000); prints figures
#
# Environment: NO_BUILD=1 skips `cargo build --release`, BENCH_TMP (parent of the scratch
# directory; default /var/tmp), BENCH_PORT (the relay's SMTP port; default 23627), ATTACH_MIB
# (size of each attachment; default 11, which makes the message 30 MiB).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COUNT=${1:-1000}
BIN=$ROOT/target/release/smtp-oauth-relay
PORT=${BENCH_PORT:-23627}
if [ -z "${NO_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
fi
[ -x "$BIN" ] || { echo "missing $BIN" >&2; exit 1; }

W=$(mktemp -d "${BENCH_TMP:-/var/tmp}/relay-graph-large.XXXXXX")
SIM=
RELAY=
cleanup() {
    [ -n "$RELAY" ] && kill -TERM "$RELAY" 2>/dev/null && wait "$RELAY" 2>/dev/null
    [ -n "$SIM" ] && kill -TERM "$SIM" 2>/dev/null && wait "$SIM" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

cat >"$W/sim.toml" <<EOF
state_dir = "$W/simulator"
[[clients]]
roles = ["Mail.Send", "Mail.ReadWrite"]
EOF
"$BIN" simulate --config "$W/sim.toml" >"$W/sim.out" 2>"$W/sim.err" &
SIM=$!
for _ in $(seq 1 3000); do
    grep -q '^# --- end ---' "$W/sim.out" 2>/dev/null && break
    kill -0 "$SIM" 2>/dev/null || { cat "$W/sim.err" >&2; exit 1; }
    sleep 0.01
done
grep -q '^# --- end ---' "$W/sim.out" || { echo "simulator did not start" >&2; exit 1; }
GRAPH_URL=$(sed -n 's/^Graph sendMail root: *\([^ ]*\).*/\1/p' "$W/sim.out")
MAILBOX=$(sed -n 's/^Mailbox directory: *//p' "$W/sim.out")

{
    printf '[smtp]\nlisten = ["127.0.0.1:%s"]\n[queue]\ndir = "%s/spool"\nretry_min = "1s"\n' "$PORT" "$W"
    printf '[log]\nlevel = "warn"\n'
    # The simulator's [upstream] and [oauth], switched to Graph with the draft path on.
    sed -n '/^\[upstream\]/,/^# --- end ---/p' "$W/sim.out" | grep -v '^# ---' |
        sed -e "s|^\[upstream\]$|[upstream]\ntransport = \"graph\"\ngraph_url = \"$GRAPH_URL\"\ngraph_large_messages = true\nconnections = 4\nrate = \"1000/s\"|" \
            -e 's|^scope = .*|scope = "https://graph.microsoft.com/.default"|'
} >"$W/relay.toml"

"$BIN" --config "$W/relay.toml" serve >"$W/relay.out" 2>"$W/relay.err" &
RELAY=$!
for _ in $(seq 1 3000); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 1).close()" 2>/dev/null && break
    kill -0 "$RELAY" 2>/dev/null || { cat "$W/relay.err" >&2; exit 1; }
    sleep 0.01
done

count() { find "$MAILBOX" -maxdepth 1 -name '*.json' 2>/dev/null | wc -l; }
wait_for() {
    # Bounded: 10 minutes.
    for _ in $(seq 1 6000); do
        [ "$(count)" -ge "$1" ] && return 0
        kill -0 "$RELAY" 2>/dev/null || { cat "$W/relay.err" >&2; exit 1; }
        sleep 0.1
    done
    echo "only $(count) of $1 delivered; relay log:" >&2
    tail "$W/relay.err" >&2
    exit 1
}
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$RELAY/status"; }

send() {
    python3 - "$PORT" "$1" <<'PY'
import base64, random, smtplib, sys
port, size = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(size)
parts = []
for name, n in (("scan.pdf", size), ("photo.jpg", size + 12345)):
    data = rng.randbytes(n)
    b64 = base64.encodebytes(data).replace(b"\n", b"\r\n")
    parts.append(
        b"--b1\r\nContent-Type: application/octet-stream; name=\"" + name.encode()
        + b"\"\r\nContent-Disposition: attachment; filename=\"" + name.encode()
        + b"\"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64
    )
msg = (b"From: relay@contoso.example\r\nTo: b@example.org\r\nSubject: large\r\n"
       b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
       b"--b1\r\nContent-Type: text/plain\r\n\r\nattached\r\n" + b"".join(parts) + b"--b1--\r\n")
with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
    s.sendmail("app@legacy.test", ["b@example.org"], msg)
print(len(msg))
PY
}

now() { date +%s.%N; }
# Warm-up: a small message through sendMail (token, TLS-free HTTP client, pools).
python3 - "$PORT" <<'PY'
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as s:
    s.sendmail("app@legacy.test", ["b@example.org"],
               b"From: relay@contoso.example\r\nTo: b@example.org\r\nSubject: warm\r\n\r\nx\r\n")
PY
wait_for 1
base=$(hwm)
t0=$(now)
ATTACH_MIB=${ATTACH_MIB:-11}
bytes=$(send $((ATTACH_MIB * 1024 * 1024)))
t1=$(now)
accept_peak=$(hwm)
# Reset the high-water mark at the 250 (Linux clear_refs "5"): what follows is the upload's.
echo 5 >"/proc/$RELAY/clear_refs"
wait_for 2
t2=$(now)
peak=$(hwm)
python3 - "$bytes" "$ATTACH_MIB" "$base" "$accept_peak" "$peak" "$t0" "$t1" "$t2" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import sys
size, each, base, accept, peak = (int(a) for a in sys.argv[1:6])
t0, t1, t2 = map(float, sys.argv[6:9])
print(
    f"graph large: one {size / 2**20:.1f} MiB message (2 attachments of {each} MiB) accepted in "
    f"{t1 - t0:.2f} s, delivered through draft + upload sessions {t2 - t1:.2f} s later "
    f"({size / 2**20 / (t2 - t1):.1f} MiB/s); relay peak RSS (VmHWM) during the upload "
    f"{peak / 1024:.1f} MiB, up to the 250 {accept / 1024:.1f} MiB, after a warm-up sendMail "
    f"{base / 1024:.1f} MiB; simulator in its own process; {sys.argv[9]} cores, load {sys.argv[10]}"
)
PY
kill -TERM "$RELAY" 2>/dev/null && wait "$RELAY" 2>/dev/null || true
RELAY=

NO_BUILD=1 BENCH_TMP="${BENCH_TMP:-/var/tmp}" "$ROOT/bench/graph.sh" "$COUNT"
