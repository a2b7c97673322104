#!/usr/bin/env python3
"""Render bench/run.sh results (JSON lines) as Markdown: medians over repeats, ratios, targets.

    report.py RESULTS.jsonl [--out BENCHMARKS.md] [--raw COPY.jsonl]

Prints the tables to stdout in any case. bench/notes.md (hand-written findings) is appended
to the file when present.
"""

import argparse
import json
import os
import shutil
import statistics


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f0(x):
    return "–" if x is None else f"{x:,.0f}"


def f1(x):
    return "–" if x is None else f"{x:,.1f}"


def f2(x):
    return "–" if x is None else f"{x:,.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--out")
    ap.add_argument("--raw")
    a = ap.parse_args()
    recs = [json.loads(l) for l in open(a.results) if l.strip()]
    by = lambda k: [r for r in recs if r.get("kind") == k]
    machine = (by("machine") or [{}])[0]
    end = (by("end") or [{}])[0]
    out = []
    p = out.append

    reps = max([r.get("rep", 1) for r in by("accept") + by("pg_accept")] + [1])
    p(f"Run: {machine.get('started')} → {end.get('finished')}, mode `{machine.get('mode')}`, "
      f"commit `{machine.get('commit')}`, {machine.get('nproc')} cores (shared), kernel "
      f"{machine.get('kernel')}, spool/queue filesystem {machine.get('fs')}. "
      f"Load average (1/5/15 min) at start {machine.get('load_start')}, at end {end.get('load_end')}. "
      f"Figures are medians of {reps} run(s); the load column is `uptime`'s at the start of each measurement.")
    p("")

    # Disk limit
    disk = {}
    for r in by("disk"):
        disk.setdefault(r["writers"], []).append(r["msgs_per_s"])
    disk_m = {w: med(v) for w, v in disk.items()}
    p("### Disk limit (10 KiB: write + fsync + rename + directory fsync, no group commit)")
    p("")
    p("| writers | messages/s (median) | runs |")
    p("|---:|---:|---|")
    for w in sorted(disk):
        p(f"| {w} | {f0(disk_m[w])} | {', '.join(f0(x) for x in disk[w])} |")
    p("")

    # Accept
    acc = {}
    for r in by("accept"):
        key = (r["size"], r["sessions"], r["target"])
        acc.setdefault(key, []).append(r)
    p("### Accept path (smtp-source -d: throughput; bench/acklat.py: final dot → 250 latency)")
    p("")
    p("| message | sessions | relay msg/s | Postfix msg/s | relay/Postfix | relay p50 / p99 ms | Postfix p50 / p99 ms | relay vs disk limit | load |")
    p("|---|---:|---:|---:|---:|---|---|---:|---|")
    accept_summary = {}
    for size, sess in sorted({(k[0], k[1]) for k in acc}):
        row = {}
        for t in ("relay", "postfix"):
            rs = acc.get((size, sess, t), [])
            rate = med([r["messages"] / r["seconds"] if r["stored"] == r["messages"] else None for r in rs])
            bad = [r for r in rs if r["stored"] != r["messages"]]
            row[t] = {
                "rate": rate,
                "p50": med([r["lat"].get("p50_ms") for r in rs]),
                "p99": med([r["lat"].get("p99_ms") for r in rs]),
                "bad": len(bad),
                "loads": [r["load"].split()[0] for r in rs],
            }
        ratio = row["relay"]["rate"] / row["postfix"]["rate"] if row["relay"]["rate"] and row["postfix"]["rate"] else None
        lim = disk_m.get(16 if sess >= 16 else 1)
        vs = row["relay"]["rate"] / lim if lim and row["relay"]["rate"] and size <= 10240 else None
        accept_summary[(size, sess)] = (row, ratio, vs)
        label = f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
        warn = ""
        if row["relay"]["bad"] or row["postfix"]["bad"]:
            warn = f" (runs with missing messages: relay {row['relay']['bad']}, Postfix {row['postfix']['bad']})"
        p(f"| {label}{warn} | {sess} | {f0(row['relay']['rate'])} | {f0(row['postfix']['rate'])} | "
          f"{f2(ratio)}× | {f1(row['relay']['p50'])} / {f1(row['relay']['p99'])} | "
          f"{f1(row['postfix']['p50'])} / {f1(row['postfix']['p99'])} | "
          f"{'–' if vs is None else f'{vs:.2f}× of 16-writer loop'} | {' '.join(row['relay']['loads'])} |")
    p("")

    # Drain
    p("### Drain path (10 KiB messages, queued before start, delivered over STARTTLS)")
    p("")
    p("| sender → sink | messages | seconds | messages/s | CPU s per 1,000 | notes |")
    p("|---|---:|---:|---:|---:|---|")
    drains = {}
    for r in by("drain"):
        n = r["queued"] - r["left"]
        rate = n / r["seconds"] if r["seconds"] > 0 else None
        cpk = r["cpu_s"] / n * 1000 if n else None
        drains[r["target"]] = (rate, cpk, r)
        name = {
            "sink": "relay → TLS sink (XOAUTH2 token from the simulator)",
            "postfix": "Postfix → TLS sink (smtp_tls_security_level = encrypt, connection reuse)",
            "simulator": "relay → simulator (XOAUTH2 verified, Exchange replies)",
        }.get(r["target"], r["target"])
        notes = f"left {r['left']}; sink got {r['sink_delta']}; load {r['load']}"
        if "peak_rss_kb" in r:
            notes += f"; peak RSS {r['peak_rss_kb'] / 1024:.1f} MiB"
        p(f"| {name} | {n:,} | {r['seconds']:.2f} | {f0(rate)} | {f2(cpk)} | {notes} |")
    sink = (by("sink") or [None])[0]
    if sink:
        p("")
        p(f"The TLS sink (bench/tls_sink.py, one Python process, shared by both senders) used "
          f"{sink['cpu_s']:.1f} CPU s for {sink['messages']:,} messages in total.")
    p("")

    # Memory and scale
    p("### Memory and scale")
    p("")
    mem = (by("mem") or [None])[0]
    if mem:
        p(f"- RSS idle (no delivery configured, empty spool): **{mem['idle_rss_kb'] / 1024:.1f} MiB**; "
          f"with 1,000 open idle sessions ({mem['sessions']}): **{mem['sessions_1000_rss_kb'] / 1024:.1f} MiB** "
          f"(≈ {(mem['sessions_1000_rss_kb'] - mem['idle_rss_kb']) / 1000:.1f} KiB per session).")
        p("")
    p("| queued messages (1 KiB) | start-up until the port accepts (s) | RSS 3 s after start (MiB) | peak RSS (MiB) | `queue list` (s) |")
    p("|---:|---:|---:|---:|---:|")
    scale = by("scale")
    for r in scale:
        p(f"| {r['queued']:,} | {r['startup_s']:.3f} | {r['rss_kb'] / 1024:.1f} | {r['hwm_kb'] / 1024:.1f} | {r['list_s']:.2f} |")
    p("")
    if len(scale) >= 3:
        a0, a1, a2 = scale[0], scale[-2], scale[-1]
        per = (a2["rss_kb"] - a0["rss_kb"]) * 1024 / max(1, a2["queued"])
        p(f"Growth: RSS +{per:,.0f} bytes per queued message at {a2['queued']:,}; "
          f"start-up {a1['startup_s']:.3f} s → {a2['startup_s']:.3f} s for {a1['queued']:,} → {a2['queued']:,} "
          f"(×{a2['startup_s'] / max(a1['startup_s'], 1e-9):.1f} for ×{a2['queued'] / max(1, a1['queued']):.0f}); "
          f"`queue list` ×{a2['list_s'] / max(a1['list_s'], 1e-9):.1f}.")
        p("")

    # Delivery memory
    dmem = by("delivery_mem")
    if dmem:
        p("### Delivery memory (large messages delivered at once to the simulator)")
        p("")
        p("| store | messages | idle RSS (MiB) | peak RSS (MiB) | peak above idle (MiB) | seconds | left / failed / simulator got | load |")
        p("|---|---|---:|---:|---:|---:|---|---|")
        for r in dmem:
            p(f"| {r.get('store', 'files')} | {r['messages']} × {r['size'] / 1048576:.0f} MiB | {r['idle_rss_kb'] / 1024:.1f} | "
              f"{r['peak_rss_kb'] / 1024:.1f} | **{r['above_idle_kb'] / 1024:.1f}** | {r['seconds']:.2f} | "
              f"{r['left']} / {r['failed']} / {r['delivered_to_sim']} | {r['load']} |")
        if not all(r.get("hwm_reset") for r in dmem):
            p("")
            p("(VmHWM could not be reset after start-up: the peak may include start-up.)")
        p("")

    # Targets
    p("### Targets (issue 8)")
    p("")
    p("| target | measured | met? |")
    p("|---|---|---|")
    s16 = accept_summary.get((10240, 16))
    if s16:
        row, ratio, vs = s16
        p(f"| accept ≥ 1.5× Postfix at 16 sessions, 10 KiB | {f2(ratio)}× | {'yes' if ratio and ratio >= 1.5 else 'no'} |")
        lim = disk_m.get(16)
        p(f"| accept within 2× of the disk's fsync limit | relay {f0(row['relay']['rate'])} msg/s vs 16-writer loop {f0(lim)} msg/s ({f2(vs)}×) | {'yes' if vs and vs >= 0.5 else 'no'} |")
    if "sink" in drains and "postfix" in drains:
        r1, r2 = drains["sink"][0], drains["postfix"][0]
        p(f"| drain ≥ Postfix's rate with TLS | relay {f0(r1)} msg/s vs Postfix {f0(r2)} msg/s | {'yes' if r1 and r2 and r1 >= r2 else 'no'} |")
    if mem:
        p(f"| idle RSS < 20 MB | {mem['idle_rss_kb'] * 1024 / 1e6:.1f} MB | {'yes' if mem['idle_rss_kb'] * 1024 < 20e6 else 'no'} |")
    for r in dmem:
        p(f"| delivery of {r['messages']} × {r['size'] >> 20} MiB at once from the {r.get('store', 'files')} store < 64 MiB above idle (issues 12, 17) | "
          f"{r['above_idle_kb'] / 1024:.1f} MiB | {'yes' if r['above_idle_kb'] < 64 * 1024 and r['left'] == 0 else 'no'} |")
    big = [r for r in scale if r["queued"] >= 100000]
    if big:
        p(f"| start-up with 100,000 queued < 2 s | {big[0]['startup_s']:.3f} s | {'yes' if big[0]['startup_s'] < 2 else 'no'} |")
    p("")

    routes = by("routes")
    if routes:
        p("### Routes: accept rate and memory by route shape (bench/routes.py)")
        p("")
        p("| scenario | mailboxes | accepted/s | accepted → all delivered | idle RSS | peak RSS | RSS after |")
        p("|---|---|---|---|---|---|---|")
        for r in routes:
            p(f"| {r['scenario']} | {r['mailboxes']} | {r['accept_per_s']:.0f} | {r['drain_s']:.1f} s "
              f"({r['delivered']}/{r['accepted']}) | {r['idle_rss_mib']:.1f} MiB | {r['peak_rss_mib']:.1f} MiB | "
              f"{r['rss_after_mib']:.1f} MiB |")
        p("")

    pg_acc = by("pg_accept")
    pg_drain = by("pg_drain")
    if pg_acc or pg_drain:
        srv = (by("pg_server") or [{}])[0]
        p("### PostgreSQL store beside the file store (part `postgres`)")
        p("")
        p(f"Throwaway PostgreSQL {srv.get('version')} on loopback, `fsync = {srv.get('fsync')}`, "
          f"`synchronous_commit = {srv.get('synchronous_commit')}`, `wal_sync_method = {srv.get('wal_sync_method')}`, "
          f"data on {srv.get('data_fs')} (the file spool's filesystem).")
        p("")
    if pg_acc:
        grp = {}
        for r in pg_acc:
            grp.setdefault((r["size"], r["sessions"]), {}).setdefault(r["store"], []).append(r)
        p("Accept: bench/acklat.py (persistent sessions; rate and final dot → 250 latency from the same run), "
          "the relay with no upstream, file store and PostgreSQL store alternating; stored messages checked after every run.")
        p("")
        p("| message | sessions | messages | file msg/s | PostgreSQL msg/s | PostgreSQL/file | file p50 / p99 ms | PostgreSQL p50 / p99 ms | runs short (file / PG) | 1-min load per run (file; PG) |")
        p("|---|---:|---:|---:|---:|---:|---|---|---|---|")
        for (size, sess) in sorted(grp):
            row = {}
            for t in ("file", "postgres"):
                rs = grp[(size, sess)].get(t, [])
                ok = lambda r: r["stored"] == r["messages"] and r["lat"].get("messages") == r["messages"] and not r["lat"].get("errors")
                row[t] = {
                    "rate": med([r["lat"].get("msgs_per_s") if ok(r) else None for r in rs]),
                    "p50": med([r["lat"].get("p50_ms") for r in rs]),
                    "p99": med([r["lat"].get("p99_ms") for r in rs]),
                    "bad": sum(1 for r in rs if not ok(r)),
                    "n": rs[0]["messages"] if rs else None,
                    "loads": [r["load"].split()[0] for r in rs],
                }
            f, g = row["file"], row["postgres"]
            ratio = g["rate"] / f["rate"] if f["rate"] and g["rate"] else None
            label = f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
            p(f"| {label} | {sess} | {f0(f['n'])} | {f0(f['rate'])} | {f0(g['rate'])} | {f2(ratio)}× | "
              f"{f1(f['p50'])} / {f1(f['p99'])} | {f1(g['p50'])} / {f1(g['p99'])} | {f['bad']} / {g['bad']} | "
              f"{' '.join(f['loads'])}; {' '.join(g['loads'])} |")
        p("")
    if pg_drain:
        p("Drain: 10 KiB messages queued in the database (accepted with no upstream), then 1 or 2 relay processes on "
          "the same database deliver to the simulator with the same `upstream.rate` and `connections` (a budget "
          "for both together). Drain time from the first process start until `relay_message` is empty; "
          "steady rate = (delivered − 1) / (last − first delivery) from the simulator's mailbox files; "
          "max 1 s = most deliveries in any 1-second window.")
        p("")
        p("| rate | connections | replicas | delivered / queued | drain s | msg/s overall | steady msg/s | max in 1 s | delivered per replica | sessions seen (sampled) | relay CPU s | left / failed / duplicates | within the shared rate? | load |")
        p("|---|---:|---:|---|---:|---:|---:|---:|---|---:|---|---|---|---|")
        for r in pg_drain:
            w = r["watch"]
            rate_n, _, unit = r["rate"].partition("/")
            per_s = float(rate_n) / {"s": 1, "min": 60}.get(unit, 1)
            overall = w["delivered"] / w["seconds"] if w.get("seconds") else None
            steady = w.get("steady_per_s")
            within = "–" if steady is None else ("yes" if steady <= per_s * 1.05 and w.get("max_1s", 0) <= per_s * 1.05 + 1 else "**no**")
            p(f"| {r['rate']} | {r['connections']} | {r['replicas']} | {w['delivered']:,} / {r['queued']:,} | "
              f"{w['seconds']:.2f} | {f1(overall)} | {f1(steady)} | {w.get('max_1s', '–')} | "
              f"{' + '.join(str(x) for x in r.get('per_replica', []))} | {w.get('peak_sessions_sampled')} | "
              f"{' + '.join(f'{c:.2f}' for c in r['cpu_s'])} | {w['left']} / {w['failed']} / {r['possible_duplicates']} | "
              f"{within} | {r['load']} |")
        p("")

    table = "\n".join(out)
    print(table)
    if a.out:
        notes_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")
        notes = open(notes_path).read() if os.path.exists(notes_path) else ""
        with open(a.out, "w") as f:
            f.write("# Benchmarks: smtp-oauth-relay vs Postfix\n\n")
            f.write("Reproduce with `bench/run.sh` (about 10 minutes; `bench/run.sh --smoke` checks the harness in "
                    "seconds). Everything runs on loopback on one machine in one run; the tables below are "
                    "generated by `bench/report.py` from `bench/results/last.jsonl`.\n\n")
            f.write(table + "\n")
            if notes:
                f.write("\n" + notes)
    if a.raw:
        os.makedirs(os.path.dirname(a.raw), exist_ok=True)
        shutil.copy(a.results, a.raw)


if __name__ == "__main__":
    main()
