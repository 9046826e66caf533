#!/usr/bin/env python3
"""Summary of relay_real.sh's JSON lines.

First a markdown row per (mode, transport, pairs, label): median and min–max over the runs of
offered and delivered kpps, loss, closed-loop stalls, server and client CPU µs per delivered
packet, p99 latency, the server's system-CPU share and the 1-minute load average before the run.
Then, when the runs hold the labels `tailnetd` and `derper` (or those given with
`--ours LABEL --theirs LABEL`), issue 16's targets per transport and pair count, each ratio taken
between the two medians:
  server CPU per packet (free) ≤ 0.5× · capacity at a quarter core ≥ 2× ·
  client CPU per packet (free) ≤ 1× · p99 at half of derper's capacity (half) ≤ 1×.
"""
import argparse
import json
import statistics
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("files", nargs="+")
ap.add_argument("--ours", default="tailnetd")
ap.add_argument("--theirs", default="derper")
args = ap.parse_args()

cells = defaultdict(list)
order = []
for path in args.files:
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


def med(mode, tr, pairs, label, key):
    vals = [r.get(key) for r in cells.get((mode, tr, pairs, label), [])]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


TRANSPORTS = ["plain", "tls", "ws", "wss"]
MODES = ["quarter", "half", "free"]
rank = lambda k: (MODES.index(k[0]) if k[0] in MODES else 9,
                  TRANSPORTS.index(k[1]) if k[1] in TRANSPORTS else 9, k[2], order.index(k))

print("| mode | transport | pairs | server | n | offered kpps | delivered kpps | loss | stalls "
      "| server CPU µs/pkt | client CPU µs/pkt | p99 µs | server sys share | load avg |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for k in sorted(order, key=rank):
    rs = cells[k]
    sys_share = [r["server_stime_ticks"] / max(1, r["server_utime_ticks"] + r["server_stime_ticks"]) for r in rs]
    print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {len(rs)} "
          f"| {fmt([r.get('actual_offered_pps', 0) / 1e3 for r in rs], '{:.1f}')} "
          f"| {fmt([r['delivered_pps'] / 1e3 for r in rs], '{:.1f}')} "
          f"| {fmt([100 * r.get('loss', 0) for r in rs], '{:.2f}%')} "
          f"| {fmt([r.get('window_stalls', 0) for r in rs], '{:.0f}')} "
          f"| {fmt([r['server_cpu_us_per_packet'] for r in rs])} "
          f"| {fmt([r['loadgen_cpu_us_per_packet'] for r in rs])} "
          f"| {fmt([r['latency_p99_us'] for r in rs], '{:.0f}')} "
          f"| {fmt([100 * s for s in sys_share], '{:.0f}%')} "
          f"| {fmt([r.get('loadavg_1m') for r in rs], '{:.1f}')} |")

targets = [
    ("server CPU µs/pkt, free", "free", "server_cpu_us_per_packet", lambda x: x <= 0.5, "≤ 0.5×"),
    ("capacity kpps at ¼ core", "quarter", "delivered_pps", lambda x: x >= 2.0, "≥ 2×"),
    ("client CPU µs/pkt, free", "free", "loadgen_cpu_us_per_packet", lambda x: x <= 1.0, "≤ 1×"),
    ("p99 µs at half of derper's capacity", "half", "latency_p99_us", lambda x: x <= 1.0, "≤ 1×"),
]
cols = sorted({(k[1], k[2]) for k in order if k[3] in (args.ours, args.theirs)},
              key=lambda c: (TRANSPORTS.index(c[0]) if c[0] in TRANSPORTS else 9, c[1]))
if cols:
    print()
    print(f"Targets: {args.ours} / {args.theirs}, ratio of medians")
    print()
    print("| target | " + " | ".join(f"{tr} {p} pairs" for tr, p in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, mode, key, ok, goal in targets:
        row = []
        for tr, p in cols:
            a, b = med(mode, tr, p, args.ours, key), med(mode, tr, p, args.theirs, key)
            if a is None or not b:
                row.append("–")
                continue
            scale = 1e-3 if key == "delivered_pps" else 1
            row.append(f"{a * scale:.2f} / {b * scale:.2f} = {a / b:.2f}× {'met' if ok(a / b) else 'missed'}")
        print(f"| {name} ({goal}) | " + " | ".join(row) + " |")
