#!/usr/bin/env python3
"""A minimal STARTTLS SMTP sink for the drain benchmark (loopback only).

Offers STARTTLS, AUTH XOAUTH2/PLAIN (any credential is accepted after STARTTLS: the token itself
is validated by nobody here; the relay's token comes from the simulator's real token endpoint),
PIPELINING, 8BITMIME, SIZE. Every message is read to the end and discarded (counted). Both the
relay and Postfix deliver to this same sink, so its cost is the same on both sides.

Writes "<messages>\n" to --count-file every 0.2 s and at exit (SIGTERM/SIGINT).
"""

import argparse
import asyncio
import signal
import ssl

COUNT = 0
SESSIONS = 0


async def handle(reader, writer, ctx):
    global COUNT, SESSIONS
    SESSIONS += 1
    tls = False
    n = 0

    def send(s: bytes):
        writer.write(s)

    try:
        send(b"220 sink.localhost ESMTP bench sink\r\n")
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = line[:4].upper()
            if cmd in (b"EHLO", b"HELO"):
                caps = [b"sink.localhost", b"PIPELINING", b"SIZE 157286400", b"8BITMIME",
                        b"ENHANCEDSTATUSCODES"]
                caps.append(b"AUTH XOAUTH2 PLAIN" if tls else b"STARTTLS")
                out = b"".join(b"250-" + c + b"\r\n" for c in caps[:-1]) + b"250 " + caps[-1] + b"\r\n"
                send(out)
            elif cmd == b"STAR" and not tls:
                send(b"220 2.0.0 go ahead\r\n")
                await writer.drain()
                await writer.start_tls(ctx)
                tls = True
            elif cmd == b"AUTH":
                parts = line.split()
                if len(parts) >= 3:
                    send(b"235 2.7.0 Authentication successful\r\n")
                else:
                    send(b"334 \r\n")
                    await writer.drain()
                    await reader.readline()
                    send(b"235 2.7.0 Authentication successful\r\n")
            elif cmd == b"MAIL" or cmd == b"RCPT":
                send(b"250 2.1.0 OK\r\n")
            elif cmd == b"DATA":
                send(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
                await writer.drain()
                first = await reader.readline()
                if first != b".\r\n":
                    await reader.readuntil(b"\r\n.\r\n")
                COUNT += 1
                n += 1
                send(b"250 2.0.0 OK <%d@sink.localhost>\r\n" % COUNT)
            elif cmd == b"RSET" or cmd == b"NOOP":
                send(b"250 2.0.0 OK\r\n")
            elif cmd == b"QUIT":
                send(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                send(b"502 5.5.2 not implemented\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        return
    finally:
        SESSIONS -= 1
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--count-file", required=True)
    a = ap.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, ctx), "127.0.0.1", a.port, limit=64 << 20
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)

    def dump():
        with open(a.count_file + ".tmp", "w") as f:
            f.write(f"{COUNT}\n")
        import os
        os.replace(a.count_file + ".tmp", a.count_file)

    async with server:
        while not stop.is_set():
            dump()
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
    dump()


if __name__ == "__main__":
    asyncio.run(main())
