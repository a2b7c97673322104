#!/usr/bin/env python3
"""Watch a PostgreSQL queue drain into the simulator; print one JSON object.

    pg_drain_watch.py --psql "psql -h 127.0.0.1 -p PORT -U postgres -d DB" --t0 EPOCH
                      --maildir DIR --sim-port PORT [--timeout 600] [--interval 0.2]

Polls `SELECT count(*) FROM relay_message` (every state) until it is 0 or --timeout passes
(bounded), sampling the established TCP connections to the simulator's SMTP port from
/proc/net/tcp{,6} at every poll (the sessions the relays hold at once, as the network sees
them). Then reads the simulator's mailbox: every `<id>.json` written after --t0 is one
delivered message (the simulator writes the JSON last), its mtime the time of delivery.

Prints: seconds (t0 -> queue empty), left, failed, delivered, first_s / last_s (first and last
delivery after t0), steady_per_s ((delivered - 1) / (last - first): the rate between the first
and the last delivery, start-up and token excluded), max_1s (most deliveries in any 1 s
window), peak_sessions_sampled. Loopback only; never asserts anything.
"""

import argparse
import bisect
import json
import os
import shlex
import subprocess
import time


def established(port: int) -> int:
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    # remote address:port of the client side = the simulator's port
                    if parts[3] == "01" and int(parts[2].rsplit(":", 1)[1], 16) == port:
                        n += 1
        except OSError:
            pass
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--psql", required=True)
    ap.add_argument("--t0", type=float, required=True)
    ap.add_argument("--maildir", required=True)
    ap.add_argument("--sim-port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--interval", type=float, default=0.2)
    a = ap.parse_args()
    psql = shlex.split(a.psql) + ["-Atq", "-c"]

    def q(sql):
        r = subprocess.run(psql + [sql], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None

    left = None
    peak = 0
    end = None
    deadline = time.time() + a.timeout
    while time.time() < deadline:
        peak = max(peak, established(a.sim_port))
        v = q("SELECT count(*) FROM relay_message WHERE state <> 'failed'")
        if v is not None:
            left = int(v)
            if left == 0:
                end = time.time()
                break
        time.sleep(a.interval)
    if end is None:
        end = time.time()
    failed = int(q("SELECT count(*) FROM relay_message WHERE state = 'failed'") or -1)
    time.sleep(0.3)  # the simulator writes its JSON after the 250
    times = []
    for e in os.scandir(a.maildir):
        if e.name.endswith(".json") and not e.name.startswith("."):
            m = e.stat().st_mtime
            if m >= a.t0:
                times.append(m)
    times.sort()
    out = {
        "seconds": round(end - a.t0, 3),
        "left": left,
        "failed": failed,
        "delivered": len(times),
        "peak_sessions_sampled": peak,
    }
    if times:
        out["first_s"] = round(times[0] - a.t0, 3)
        out["last_s"] = round(times[-1] - a.t0, 3)
        span = times[-1] - times[0]
        out["steady_per_s"] = round((len(times) - 1) / span, 1) if span > 0 else None
        out["max_1s"] = max(bisect.bisect_right(times, t + 1.0) - i for i, t in enumerate(times))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
