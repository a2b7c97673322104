#!/usr/bin/env bash
# Graph deliveries per second: `serve --simulate` with upstream.transport = "graph" drains a spool
# of N queued 10 KiB messages to the simulator's Graph sendMail endpoint (token audience and
# Mail.Send checked, base64 decoded, MIME stored), 4 requests in flight. Loopback only.
#
#   bench/graph.sh [COUNT]      default COUNT=2000; prints one line of figures
#
# Environment: NO_BUILD=1 skips `cargo build --release`, BENCH_TMP (parent of the scratch
# directory; default /var/tmp), BENCH_PORT (the relay's SMTP port; default 23625).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COUNT=${1:-2000}
BIN=$ROOT/target/release/smtp-oauth-relay
PORT=${BENCH_PORT:-23625}
if [ -z "${NO_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
fi
[ -x "$BIN" ] || { echo "missing $BIN" >&2; exit 1; }

W=$(mktemp -d "${BENCH_TMP:-/var/tmp}/relay-graph-bench.XXXXXX")
PID=
cleanup() {
    [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

python3 "$ROOT/bench/gen_spool.py" --spool "$W/spool" --count "$COUNT" --size 10240
cat >"$W/relay.toml" <<EOF
[smtp]
listen = ["127.0.0.1:$PORT"]
[queue]
dir = "$W/spool"
retry_min = "200ms"
retry_max = "1s"
[upstream]
transport = "graph"
connections = 4
rate = "1000/s"
[oauth]
# serve --simulate replaces these with the simulator's tenant, app and secret.
tenant_id = "9188040d-6c67-4c5b-b112-36a304b66dad"
client_id = "0f6a3d44-7c2b-4e1a-9d55-3b2f1c8e7a10"
client_secret = "replaced-by-the-simulator"
[log]
level = "warn"
EOF
sed -i "s/^\[upstream\]$/[upstream]\nmail_account = \"relay@contoso.example\"/" "$W/relay.toml"

MAILBOX=$W/simulator/mailbox
count() { find "$MAILBOX" -maxdepth 1 -name '*.json' 2>/dev/null | wc -l; }
now() { date +%s.%N; }

t_start=$(now)
"$BIN" --config "$W/relay.toml" serve --simulate >"$W/serve.out" 2>"$W/serve.err" &
PID=$!
# Bounded waits: the first delivery within 60 s, all of them within 10 minutes.
t_first=
for _ in $(seq 1 6000); do
    if [ "$(count)" -ge 1 ]; then t_first=$(now); break; fi
    kill -0 "$PID" 2>/dev/null || { cat "$W/serve.err" >&2; exit 1; }
    sleep 0.01
done
[ -n "$t_first" ] || { echo "nothing delivered within 60 s" >&2; tail "$W/serve.err" >&2; exit 1; }
t_end=
for _ in $(seq 1 60000); do
    if [ "$(count)" -ge "$COUNT" ]; then t_end=$(now); break; fi
    sleep 0.01
done
[ -n "$t_end" ] || { echo "only $(count) of $COUNT delivered within 10 minutes" >&2; exit 1; }
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$PID/status")
cpu=$(awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/t}' "/proc/$PID/stat")
left=$(find "$W/spool/queue" -name '*.msg' | wc -l)
failed=$(find "$W/spool/failed" -name '*.msg' | wc -l)
python3 - "$COUNT" "$t_start" "$t_first" "$t_end" "$hwm" "$cpu" "$left" "$failed" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import sys
n, t0, t1, t2 = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
hwm, cpu, left, failed, cores, load = sys.argv[5], sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9], sys.argv[10]
rate = (n - 1) / (t2 - t1) if t2 > t1 else float("inf")
print(
    f"graph drain: {n} x 10 KiB to the simulator's sendMail in {t2 - t1:.2f} s after the first "
    f"delivery ({t1 - t0:.2f} s start-up): {rate:.0f} deliveries/s; relay CPU {cpu} s "
    f"(relay and simulator share the process), peak RSS {int(hwm) / 1024:.1f} MiB; "
    f"left {left}, failed {failed}; {cores} cores, load {load}"
)
PY
