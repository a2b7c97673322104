#!/usr/bin/env python3
"""Routes: accept rate, drain time and memory of the relay with 1 route, with 50 routes of one
mailbox each, and with 1 template route ("{sender}") over 500 mailboxes, in one run.

One simulator process (one tenant, 500 mailboxes dev0..dev499@contoso.example, limits raised
so that figures are about the relay) serves every scenario; each scenario starts its own relay
process with a fresh spool, sends MESSAGES messages over SESSIONS concurrent SMTP sessions
(senders cycling over the scenario's mailboxes), and waits until the simulator has them all.

Prints a table and one JSON object per scenario. Loopback only; every wait is bounded.
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

MAILBOXES = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def raise_nofile():
    # 500 mailboxes x up to 3 upstream sessions each, beside the inbound ones.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def start_sim(binary: str, work: str):
    lines = [f'state_dir = "{work}/sim-state"']
    for i in range(MAILBOXES):
        lines.append(f'[[mailboxes]]\naddress = "dev{i}@contoso.example"\nfull_access = true')
    lines.append(
        "[smtp]\nmessages_per_window = 1000000\nrecipients_per_day = 100000000\n"
        "connections_per_mailbox = 3\n"
    )
    cfg = os.path.join(work, "sim.toml")
    with open(cfg, "w") as f:
        f.write("\n".join(lines) + "\n")
    log = open(os.path.join(work, "sim.log"), "w")
    proc = subprocess.Popen(
        [binary, "simulate", "--config", cfg],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        preexec_fn=raise_nofile,
    )
    fragment, mailbox, inside = [], None, False
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("Mailbox directory:"):
            mailbox = line.split(":", 1)[1].strip()
        if line.startswith("# --- relay.toml fragment"):
            inside = True
            continue
        if line.startswith("# --- end"):
            break
        if inside:
            fragment.append(line.rstrip("\n"))
    if not fragment or not mailbox:
        sys.exit("the simulator did not print its fragment")
    return proc, "\n".join(fragment), mailbox


def scenario_config(name: str, fragment: str, port: int, spool: str) -> tuple[str, int, int]:
    """The relay.toml of a scenario, how many distinct senders it uses and how many mailboxes
    they are sent as."""
    top = fragment.replace("[upstream]\n", '[upstream]\nrate = "1000/s"\n', 1)
    head = (
        f'[smtp]\nlisten = ["127.0.0.1:{port}"]\nhostname = "relay.bench"\n'
        f'[queue]\ndir = "{spool}"\nmin_free_space = 1\nretry_min = "200ms"\nretry_max = "2s"\n'
        '[log]\nlevel = "warn"\n'
    )
    if name == "1 route":
        return head + top, MAILBOXES, 1
    if name == "50 routes x 1 mailbox":
        routes = []
        for i in range(50):
            routes.append(
                f'[[route]]\nname = "r{i}"\nmatch_sender = ["dev{i}@contoso.example"]\n'
                f'[route.upstream]\nmail_account = "dev{i}@contoso.example"\n'
            )
        return head + top + "\n" + "\n".join(routes), 50, 50
    routes = (
        '[[route]]\nname = "devices"\nmatch_sender = ["*@contoso.example"]\n'
        '[route.upstream]\nmail_account = "{sender}"\n'
    )
    return head + top + "\n" + routes, MAILBOXES, MAILBOXES


async def session(port: int, senders: list, queue: asyncio.Queue, body: bytes, stats: dict):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await asyncio.wait_for(reader.readline(), 60)
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.test\r\n")
    await reply()
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        sender = senders[i % len(senders)]
        writer.write(
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n".encode()
        )
        codes = [await reply() for _ in range(3)]
        if not all(c.startswith(b"250") or c.startswith(b"354") for c in codes):
            stats["errors"] += 1
            writer.write(b"RSET\r\n")
            await reply()
            continue
        writer.write(f"From: {sender}\r\nSubject: bench {i}\r\n\r\n".encode() + body + b".\r\n")
        if (await reply()).startswith(b"250"):
            stats["accepted"] += 1
        else:
            stats["errors"] += 1
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


async def send_all(port: int, senders: list, messages: int, sessions: int, body: bytes) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)
    stats = {"accepted": 0, "errors": 0}
    await asyncio.gather(*(session(port, senders, queue, body, stats) for _ in range(sessions)))
    return stats


def delivered(mailbox: str) -> int:
    try:
        return sum(1 for n in os.listdir(mailbox) if n.endswith(".json"))
    except FileNotFoundError:
        return 0


def run(binary: str, work: str, name: str, fragment: str, mailbox: str, args) -> dict:
    spool = os.path.join(work, name.replace(" ", "-"), "spool")
    os.makedirs(spool)
    port = free_port()
    text, n_senders, n_mailboxes = scenario_config(name, fragment, port, spool)
    cfg = os.path.join(os.path.dirname(spool), "relay.toml")
    with open(cfg, "w") as f:
        f.write(text)
    err = open(os.path.join(os.path.dirname(spool), "relay.log"), "w")
    relay = subprocess.Popen(
        [binary, "--config", cfg, "serve"], stderr=err, stdout=subprocess.DEVNULL,
        preexec_fn=raise_nofile,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if relay.poll() is not None:
                    sys.exit(f"{name}: the relay exited; see {err.name}")
                time.sleep(0.05)
        idle_kib = kib(relay.pid, "VmRSS")
        before = delivered(mailbox)
        senders = [f"dev{i}@contoso.example" for i in range(n_senders)]
        body = (b"x" * 76 + b"\r\n") * max(1, args.size // 78)
        t0 = time.time()
        stats = asyncio.run(send_all(port, senders, args.messages, args.sessions, body))
        t1 = time.time()
        deadline = t1 + args.timeout
        while delivered(mailbox) - before < stats["accepted"] and time.time() < deadline:
            time.sleep(0.05)
        t2 = time.time()
        done = delivered(mailbox) - before
        return {
            "scenario": name,
            "senders": n_senders,
            "mailboxes": n_mailboxes,
            "messages": args.messages,
            "accepted": stats["accepted"],
            "refused": stats["errors"],
            "accept_per_s": round(stats["accepted"] / (t1 - t0), 1),
            "delivered": done,
            "drain_s": round(t2 - t0, 2),
            "idle_rss_mib": round(idle_kib / 1024, 1),
            "peak_rss_mib": round(kib(relay.pid, "VmHWM") / 1024, 1),
            "rss_after_mib": round(kib(relay.pid, "VmRSS") / 1024, 1),
        }
    finally:
        relay.terminate()
        try:
            relay.wait(30)
        except subprocess.TimeoutExpired:
            relay.kill()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="relay-routes-bench.", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    sim, fragment, mailbox = start_sim(args.bin, work)
    results = []
    try:
        for name in ["1 route", "50 routes x 1 mailbox", "1 template route x 500 mailboxes"]:
            results.append(run(args.bin, work, name, fragment, mailbox, args))
    finally:
        sim.terminate()
        sim.wait(30)
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'scenario':36} {'accept/s':>9} {'drain s':>8} {'idle MiB':>9} {'peak MiB':>9} {'after MiB':>9}  delivered")
    for r in results:
        print(
            f"{r['scenario']:36} {r['accept_per_s']:>9} {r['drain_s']:>8} {r['idle_rss_mib']:>9} "
            f"{r['peak_rss_mib']:>9} {r['rss_after_mib']:>9}  {r['delivered']}/{r['accepted']}"
        )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
