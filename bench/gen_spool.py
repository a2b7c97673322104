#!/usr/bin/env python3
"""Fill a relay spool with N queued messages quickly (no fsync per file; one sync at the end).

Writes the relay's message format version 1 exactly as src/spool/format.rs (encode_header)
produces it: `Spool-Format: 1`, Id, Received-At, Client, Helo, Mail-From, Body, Smtputf8,
Rcpt-To, Body-Length (20 digits), blank line, then the message bytes. Ids are ULIDs that sort
in creation order. The relay must be stopped (recovery validates every file at start-up).
"""

import argparse
import os
import time

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid(ms: int, rnd: int) -> str:
    v = (ms << 80) | rnd
    out = []
    for _ in range(26):
        out.append(CROCKFORD[v & 31])
        v >>= 5
    return "".join(reversed(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spool", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--state", choices=["queue", "held"], default="queue",
                    help="directory the messages go to (held: released later with `queue release`)")
    a = ap.parse_args()
    for d in ("tmp", "queue", "held", "failed", "corrupt", "state"):
        os.makedirs(os.path.join(a.spool, d), mode=0o700, exist_ok=True)
    qdir = os.path.join(a.spool, a.state)
    ms = int(time.time() * 1000)
    base_rnd = int.from_bytes(os.urandom(8), "big") << 16
    line = b"y" * 76 + b"\r\n"
    for i in range(a.count):
        mid = ulid(ms, base_rnd + i)
        head = (
            "From: gen <gen@legacy.test>\r\nTo: <rcpt@example.org>\r\n"
            f"Subject: generated {i}\r\nMessage-ID: <{mid}@legacy.test>\r\n\r\n"
        ).encode()
        body = head + line * max(1, (a.size - len(head)) // len(line))
        t = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%09dZ" % int((t % 1) * 1e9)
        hdr = (
            "Spool-Format: 1\n"
            f"Id: {mid}\n"
            f"Received-At: {stamp}\n"
            "Client: 127.0.0.1:40000\n"
            "Helo: gen.legacy.test\n"
            "Mail-From: <gen@legacy.test>\n"
            "Body: 7BIT\n"
            "Smtputf8: no\n"
            "Rcpt-To: <rcpt@example.org>\n"
            f"Body-Length: {len(body):020d}\n\n"
        ).encode()
        with open(os.path.join(qdir, mid + ".msg"), "wb") as f:
            f.write(hdr)
            f.write(body)
    os.sync()


if __name__ == "__main__":
    main()
