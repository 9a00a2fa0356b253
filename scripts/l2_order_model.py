#!/usr/bin/env python3
"""A model of how the reduce kernel's streamed query blocks reuse L2 under an order of its dK/dV items, to compare
item orders before a device run (docs/performance.md backward v3.12). Not a measurement.

Model: a sliding-tile pattern (window 3 in every axis, windows shifted inside the grid as the spec says) on a tile
grid; an item is one 128-key block of a (kv head, key tile) (3 per 384-token tile); it streams the 64-query blocks
(6 per tile) of every query tile that sees its key tile, in raster order, one block per time step; 132 persistent
CTAs take items in order as they finish. Every streamed block touches 64 KB (its Q and dO, bf16, and its fp32 dQ
accumulator rows, D 128), kept in a fully associative LRU cache of the L2's size. Printed: the share of block visits
that miss, and the makespan over the ideal (the tail the order leaves).

    python3 scripts/l2_order_model.py [--l2-mb 50]

On row 1 (5x6x10 tiles, 24 heads) it gives 17.8% misses for v3.2's order (every head's heaviest tiles first, the
default) and 1.8% for v3.12's locality order, with the same tail; ncu measured 18% and 23% (v3.12, 4 heads) and
18.5% and 22.5% (v3.25, 24 heads): the model misses what makes the locality order worse, so it does not choose
orders (docs/performance.md backward v3.25). The sweep (v3.26: per head w slowest, each item's query tiles w
slowest too) it puts at 1.9% on row 1 and 1.4% on Wan at 50 MB (7.5% and 2.5% at 25 MB); measured, row 1's misses
stayed at 17% and its time unchanged while Wan gained 3-4%. scripts/l2_probe.cu measures what the L2 keeps per
access type, to give this model its capacities before it is trusted again.
"""
import argparse
import collections
import heapq


def query_tiles(grid, window=3):
    """For each key tile, the query tiles whose (border-shifted) window contains it, in raster order."""
    def start(c, n):
        return min(max(c - window // 2, 0), max(n - window, 0))

    def sees(q, k, n):
        return start(q, n) <= k < start(q, n) + window

    tiles = [(t, h, w) for t in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])]
    return tiles, {k: [q for q in tiles if all(sees(q[a], k[a], grid[a]) for a in range(3))] for k in tiles}


def simulate(grid, heads, order, l2_mb, ctas=132, key_blocks=3, query_blocks=6):
    tiles, seen_by = query_tiles(grid)
    load = {k: len(v) for k, v in seen_by.items()}
    axes = sorted(range(3), key=lambda a: -grid[a])  # largest extent slowest (HopperBackend::dkdv_item_order)

    def locality(k):
        return tuple(k[a] for a in axes)

    items = [(h, k) for h in range(heads) for k in tiles]
    sweep = order.startswith("sweep")
    if order == "heaviest-first (v3.2)":
        items.sort(key=lambda it: (-load[it[1]], it[0], it[1]))
    elif sweep:  # v3.26: per head w slowest, then h, t fastest; the last head heaviest first
        items.sort(key=lambda it: (it[0], -load[it[1]] if it[0] == heads - 1 else 0, it[1][2], it[1][1], it[1][0]))
    else:  # v3.12: per head in locality order, the last head heaviest first
        items.sort(key=lambda it: (it[0], -load[it[1]] if it[0] == heads - 1 else 0, locality(it[1])))
    work = [(h, k) for h, k in items for _ in range(key_blocks)]
    cache, capacity = collections.OrderedDict(), int(l2_mb * 1024 / 64)
    misses = visits = taken = end = 0
    streams = {}

    def stream(h, k):  # a function, not a generator expression: h must not be read late, after the next item
        # raster order, or under the sweep w slowest (KeyBlockCursorT's walk_width_slowest)
        for q in sorted(seen_by[k], key=lambda q: (q[2], q[1], q[0])) if sweep else seen_by[k]:
            for b in range(query_blocks):
                yield h, q, b

    clock = [(0, c) for c in range(ctas)]
    while clock:
        now, c = heapq.heappop(clock)
        end = max(end, now)
        block = next(streams[c], None) if c in streams else None
        if block is None:
            if taken == len(work):
                continue
            h, k = work[taken]
            taken += 1
            streams[c] = stream(h, k)
            block = next(streams[c])
        visits += 1
        if block in cache:
            cache.move_to_end(block)
        else:
            misses += 1
            cache[block] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
        heapq.heappush(clock, (now + 1, c))
    return misses / visits, end / (visits / ctas) - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--l2-mb", type=float, default=50.0)
    args = ap.parse_args()
    rows = {"Hunyuan 30x48x80 w3x3x3": ((5, 6, 10), 24), "Hunyuan 33x45x80 (partial)": ((6, 6, 10), 24),
            "Wan2.1 21x45x80": ((4, 6, 10), 40)}
    print("| row | order | streamed blocks missing L2 | tail over ideal |\n|---|---|---|---|")
    for name, (grid, heads) in rows.items():
        for order in ("heaviest-first (v3.2)", "locality, last head heaviest first (v3.12)", "sweep (v3.26)"):
            miss, tail = simulate(grid, heads, order, args.l2_mb)
            print(f"| {name} | {order} | {100 * miss:.1f}% | +{100 * tail:.2f}% |")


if __name__ == "__main__":
    main()
