#!/usr/bin/env python3
"""Summary of relay_real.sh's JSON lines: one markdown row per (mode, transport, pairs, label),
median and min–max over the runs of delivered kpps, server and client CPU µs per delivered
packet, p99 latency, and the server's system-CPU share."""
import json
import statistics
import sys
from collections import defaultdict

cells = defaultdict(list)
order = []
for path in sys.argv[1:]:
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        k = (r["mode"], r["tls"], r["pairs"], r["label"])
        if k not in cells:
            order.append(k)
        cells[k].append(r)


def fmt(vals, f="{:.2f}"):
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return "–"
    return (f + " (" + f + "–" + f + ")").format(statistics.median(vals), vals[0], vals[-1])


print("| mode | transport | pairs | server | n | delivered kpps | server CPU µs/pkt | client CPU µs/pkt | p99 µs | server sys share |")
print("|---|---|---|---|---|---|---|---|---|---|")
for k in sorted(order, key=lambda k: (k[0], k[1], k[2], order.index(k))):
    rs = cells[k]
    sys_share = [r["server_stime_ticks"] / max(1, r["server_utime_ticks"] + r["server_stime_ticks"]) for r in rs]
    print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {len(rs)} "
          f"| {fmt([r['delivered_pps'] / 1e3 for r in rs], '{:.1f}')} "
          f"| {fmt([r['server_cpu_us_per_packet'] for r in rs])} "
          f"| {fmt([r['loadgen_cpu_us_per_packet'] for r in rs])} "
          f"| {fmt([r['latency_p99_us'] for r in rs], '{:.0f}')} "
          f"| {fmt([100 * s for s in sys_share], '{:.0f}%')} |")
