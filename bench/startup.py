#!/usr/bin/env python3
"""Start a daemon, poll 127.0.0.1:PORT every 2 ms until it accepts (bounded by --timeout) and
print "<pid> <seconds until the port accepted>". The daemon keeps running (its own session);
stdout/stderr go to --log."""

import argparse
import socket
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--log", required=True)
ap.add_argument("--timeout", type=float, default=60)
ap.add_argument("cmd", nargs=argparse.REMAINDER)
a = ap.parse_args()
if a.cmd and a.cmd[0] == "--":
    a.cmd = a.cmd[1:]
log = open(a.log, "ab")
t0 = time.perf_counter()
p = subprocess.Popen(a.cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
deadline = t0 + a.timeout
while time.perf_counter() < deadline:
    if p.poll() is not None:
        print(f"{p.pid} -1")
        sys.exit(1)
    try:
        with socket.create_connection(("127.0.0.1", a.port), timeout=0.5):
            pass
        print(f"{p.pid} {time.perf_counter() - t0:.4f}")
        sys.exit(0)
    except OSError:
        time.sleep(0.002)
print(f"{p.pid} -1")
sys.exit(1)
