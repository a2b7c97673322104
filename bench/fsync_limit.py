#!/usr/bin/env python3
"""The disk's limit for durable accepts: a plain loop of
open(tmp, O_EXCL) + write(size) + fsync(file) + rename(tmp -> dir/) + fsync(dir) per message,
with W writer threads (fsync releases the GIL), no group commit. Bounded by --messages.
Prints JSON: writers, messages, seconds, msgs_per_s.
"""

import argparse
import json
import os
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--writers", type=int, default=1)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=10240)
    a = ap.parse_args()
    tmp = os.path.join(a.dir, "tmp")
    dst = os.path.join(a.dir, "queue")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(dst, exist_ok=True)
    data = b"x" * a.size
    per = [a.messages // a.writers + (1 if i < a.messages % a.writers else 0) for i in range(a.writers)]

    def worker(w, n):
        for i in range(n):
            name = f"{w}-{i}.msg"
            t = os.path.join(tmp, name)
            fd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(t, os.path.join(dst, name))
            dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    threads = [threading.Thread(target=worker, args=(w, n)) for w, n in enumerate(per)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for name in os.listdir(dst):
        os.unlink(os.path.join(dst, name))
    print(json.dumps({
        "writers": a.writers,
        "messages": a.messages,
        "seconds": round(dt, 3),
        "msgs_per_s": round(a.messages / dt, 1),
    }))


if __name__ == "__main__":
    main()
