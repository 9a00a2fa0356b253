#!/usr/bin/env python3
"""Summarises ncu's per-instruction warp stall sampling (`ncu -i REP --page source --csv --print-source sass`):
the instructions with the most samples (and their two main stall reasons), samples by opcode and by reason.

Usage: scripts/stall_summary.py SOURCE.csv [--top N]
The stall-reason columns are recognised by name (ncu calls them stall_* in the source view); the total is the
"Warp Stall Sampling (All Samples)" column, or the sum of the reasons when it is missing.

Two more sections when the "Instructions Executed" column is there:
- by role: the samples grouped by how many times an instruction was executed. In a warp-specialised kernel the
  roles run different code, so the counts tell them apart (v3.7's reduce kernel: 27,993,600 for the consumers' block
  loop, 8 warps; 3,499,200 for a one-warp producer loop); each group gets its top reasons.
- mbarrier waits: every SYNCS.PHASECHK try-wait with the samples of it and the two instructions after it (the
  branch of its retry loop), the barrier's shared-memory offset and the execution count, to see which role waits on
  which barrier (v3.7: the consumers' waits were 2% of the samples, refuting a producer-bound hypothesis).
- memory (when the source counters are there): shared-memory wavefronts by opcode with the excess over the ideal
  (bank conflicts), the instructions with the most excess wavefronts, and local-memory traffic (spills) by how
  often its instructions run, i.e. by role."""
import argparse
import collections
import csv
import re
import sys


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # ncu may print a few lines before the header: the header is the first row naming the source column
    start = next((i for i, r in enumerate(rows) if "Source" in r), None)
    if start is None:
        sys.exit(f"stall_summary.py: no 'Source' column in {path}: expected ncu --page source --csv output")
    header, body = rows[start], rows[start + 1:]
    return header, [r for r in body if len(r) == len(header)]


def opcode(sass: str, modifiers: bool = False) -> str:
    """The instruction's opcode without its predicate: "STS.64", or "STS" without the modifiers."""
    op = re.sub(r"^@!?U?P\w+\s+", "", sass.strip()).split(" ")[0]
    return op if modifiers else op.split(".")[0]


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args()
    header, rows = read(args.csv)
    src = header.index("Source")
    reasons = [i for i, h in enumerate(header) if re.match(r"^stall_\w+", h)]
    total_col = next((i for i, h in enumerate(header) if h.startswith("Warp Stall Sampling (All")), None)
    if total_col is None and not reasons:
        sys.exit("stall_summary.py: no stall sampling columns: profile with --set full (or SourceCounters)")

    def total(r):
        return number(r[total_col]) if total_col is not None else sum(number(r[i]) for i in reasons)

    samples = sum(total(r) for r in rows) or 1.0
    by_op, by_reason = collections.Counter(), collections.Counter()
    for r in rows:
        by_op[opcode(r[src])] += total(r)
        for i in reasons:
            by_reason[header[i]] += number(r[i])
    print(f"# {int(samples)} samples. Top instructions: share of samples, SASS, top two stall reasons")
    for r in sorted(rows, key=total, reverse=True)[:args.top]:
        top = sorted(((number(r[i]), header[i]) for i in reasons), reverse=True)[:2]
        why = " ".join(f"{name}={int(n)}" for n, name in top if n > 0)
        print(f"{100 * total(r) / samples:5.1f}%  {r[src].strip()[:60]:60s} {why}")
    print("# by opcode: " + ", ".join(f"{op} {100 * n / samples:.1f}%" for op, n in by_op.most_common(12)))
    reason_total = sum(by_reason.values()) or 1.0
    print("# by stall reason: " + ", ".join(f"{name.removeprefix('stall_')} {100 * n / reason_total:.1f}%"
                                            for name, n in by_reason.most_common(10)))
    executed = next((i for i, h in enumerate(header) if h == "Instructions Executed"), None)
    if executed is None:
        return
    groups = collections.defaultdict(list)
    for r in rows:
        groups[number(r[executed])].append(r)
    print("# by role (instructions executed this many times): share of samples, top reasons within")
    ranked = sorted(groups.items(), key=lambda kv: -sum(total(r) for r in kv[1]))
    for count, members in ranked[:5]:
        share = sum(total(r) for r in members)
        why = collections.Counter()
        for r in members:
            for i in reasons:
                why[header[i]] += number(r[i])
        top = ", ".join(f"{name.removeprefix('stall_')} {100 * n / (share or 1):.0f}%" for name, n in why.most_common(4))
        print(f"  {int(count):>12,d} x {len(members):5d} instructions: {100 * share / samples:5.1f}%  ({top})")
    print("# mbarrier waits (try-wait + the 2 instructions after it): share of samples, executed, SASS")
    for i, r in enumerate(rows):
        if "PHASECHK" not in r[src]:
            continue
        share = sum(total(x) for x in rows[i:i + 3])
        if share / samples >= 0.0005:
            print(f"{100 * share / samples:5.2f}%  {int(number(r[executed])):>12,d}  {r[src].strip()[:70]}")
    memory(header, rows, src, executed)


def memory(header, rows, src, executed):
    """Shared-memory wavefronts (and their excess over the ideal: bank conflicts) and local-memory instructions."""
    col = {h: i for i, h in enumerate(header)}
    waves, ideal = col.get("L1 Wavefronts Shared"), col.get("L1 Wavefronts Shared Ideal")
    if waves is None or ideal is None:
        return
    by_op = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in rows:
        w = number(r[waves])
        if w:
            op = by_op[opcode(r[src], modifiers=True)]
            op[0] += number(r[executed])
            op[1] += w
            op[2] += number(r[ideal])
    print("# shared memory (LSU) by opcode: executed, wavefronts, ideal, wavefronts per instruction")
    for op, (n, w, i) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:10]:
        print(f"  {op:24s} {int(n):>14,d} {int(w):>14,d} {int(i):>14,d}  {w / (n or 1):5.2f}")
    print("# most excess shared wavefronts (bank conflicts): excess, executed, SASS")
    for r in sorted(rows, key=lambda r: number(r[ideal]) - number(r[waves]))[:8]:
        excess = number(r[waves]) - number(r[ideal])
        if excess > 0:
            print(f"  {int(excess):>14,d} {int(number(r[executed])):>12,d}  {r[src].strip()[:70]}")
    local = collections.Counter()
    for r in rows:
        if re.search(r"\b(LDL|STL)", r[src]):
            local[number(r[executed])] += 1
    print("# local memory (LDL/STL) instructions, grouped by execution count: count x instructions = total")
    for count, n in sorted(local.items(), key=lambda kv: -kv[0] * kv[1])[:6]:
        print(f"  {int(count):>12,d} x {n:4d} = {int(count * n):>14,d}")


if __name__ == "__main__":
    main()
