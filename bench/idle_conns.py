#!/usr/bin/env python3
"""Open N SMTP sessions to 127.0.0.1:PORT (greeting + EHLO each), print "ready N errors E", then
hold them idle until SIGTERM or --hold seconds pass. Bounded: one connection per slot, no retries."""

import argparse
import asyncio
import signal


async def one(port, conns):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readline()
    w.write(b"EHLO idle.test\r\n")
    while True:
        line = await r.readline()
        if not line or line[3:4] != b"-":
            break
    conns.append(w)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--hold", type=float, default=60)
    a = ap.parse_args()
    conns = []
    sem = asyncio.Semaphore(100)

    async def guarded():
        async with sem:
            await one(a.port, conns)

    res = await asyncio.gather(*(guarded() for _ in range(a.n)), return_exceptions=True)
    errs = [r for r in res if isinstance(r, Exception)]
    print(f"ready {len(conns)} errors {len(errs)}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), a.hold)
    except asyncio.TimeoutError:
        pass
    for w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
