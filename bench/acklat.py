#!/usr/bin/env python3
"""Acknowledgement latency: time from sending the final "." of DATA to receiving the 250.

N concurrent sessions share a bounded total of messages; every session keeps its connection
(EHLO once, then MAIL/RCPT/DATA per message), so the timed interval is the server's
end-of-data work alone: for the relay, write + fsync + rename + directory fsync (group commit);
for Postfix, cleanup's queue file write + fsync.

Prints one JSON object: messages, seconds, msgs_per_s, p50_ms, p99_ms, max_ms, errors.
Loopback only; every loop is bounded by --messages and --timeout.
"""

import argparse
import asyncio
import json
import sys
import time


def make_body(size: int) -> bytes:
    head = (
        b"From: bench <bench@legacy.test>\r\n"
        b"To: <rcpt@example.org>\r\n"
        b"Subject: acknowledgement latency\r\n"
        b"\r\n"
    )
    line = b"x" * 76 + b"\r\n"
    n = max(0, size - len(head)) // len(line) + 1
    return head + line * n


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """Read one (possibly multi-line) reply; return the last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def expect(reader, code: bytes):
    line = await read_reply(reader)
    if not line.startswith(code):
        raise RuntimeError(f"expected {code!r}, got {line!r}")
    return line


async def session(host, port, queue, body, lat, errors):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await expect(reader, b"220")
        writer.write(b"EHLO bench.test\r\n")
        await expect(reader, b"250")
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            writer.write(b"MAIL FROM:<bench@legacy.test>\r\n")
            await expect(reader, b"250")
            writer.write(b"RCPT TO:<rcpt@example.org>\r\n")
            await expect(reader, b"250")
            writer.write(b"DATA\r\n")
            await expect(reader, b"354")
            writer.write(body)
            await writer.drain()
            t0 = time.perf_counter()
            writer.write(b".\r\n")
            line = await read_reply(reader)
            t1 = time.perf_counter()
            if line.startswith(b"250"):
                lat.append(t1 - t0)
            else:
                errors.append(line.decode(errors="replace").strip())
        writer.write(b"QUIT\r\n")
        try:
            await asyncio.wait_for(read_reply(reader), 5)
        except Exception:
            pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=10240)
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    body = make_body(a.size) + b""
    q = asyncio.Queue()
    for i in range(a.messages):
        q.put_nowait(i)
    lat, errors = [], []
    t0 = time.perf_counter()
    tasks = [session(a.host, a.port, q, body, lat, errors) for _ in range(a.sessions)]
    res = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), a.timeout)
    dt = time.perf_counter() - t0
    for r in res:
        if isinstance(r, Exception):
            errors.append(repr(r))
    lat.sort()

    def pct(p):
        if not lat:
            return None
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3)

    out = {
        "messages": len(lat),
        "seconds": round(dt, 3),
        "msgs_per_s": round(len(lat) / dt, 1) if dt > 0 else None,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1] * 1000, 3) if lat else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }
    print(json.dumps(out))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
