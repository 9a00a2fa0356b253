#!/usr/bin/env python3
"""A model of how the reduce kernel's streamed query blocks reuse the L2 under an order of its dK/dV items, to compare
item orders before a device run (docs/performance.md backward v3.12, v3.26, v3.36). Not a measurement.

Work: a sliding-tile pattern (window 3 in every axis, windows shifted inside the grid as the spec says) on a tile
grid; a unit is one 128-key block of a (kv head, key tile) (3 per 384-token tile, taken one after another); it
streams the 64-query blocks (6 per tile) of every query tile that sees its key tile, one block per time step
(raster order, or under the sweep w slowest: KeyBlockCursorT's walk_width_slowest); 132 persistent CTAs take units
in order as they finish. Every visit reads the block's Q and dO (32 KB, bf16) and adds into its fp32 dQ
accumulator rows (32 KB).

Two caches:
- `lru` (v3.12-v3.26): one fully associative LRU of the L2's size holding 64 KB per block. It never ranked the
  measured orders (row 1: 17.8% misses for heaviest first, 1.8% for the locality order, 1.9% for the sweep; ncu
  18.5%, 22.5%, 17.0%).
- `partitions` (v3.36), from what scripts/l2_probe.cu measured (v3.27): two halves of the L2, each an LRU of half
  its size; a read is looked up in the half of the reading CTA and a miss copies the line there (plain loads from
  every SM keep ~28 of the 60 MB: each line twice); a reduction is performed at the line's home half (each 32 KB
  accumulator block split 16 KB / 16 KB, as addresses interleave) and a line it misses is read from DRAM; a half
  writes its least recently dirtied line back, keeping it clean, once its dirty lines pass `--dirty-mb` / 2
  (reductions keep lines to 48 MB but write back beyond ~25 MB), and writes a dirty line back when it evicts it.
  Printed: DRAM GB read and written per kernel (the units' Q, dO and accumulator lines only). It ranks the sweep's
  variants as measured (v3.36, row 1 at 30 MB / 12 MB dirty: sweep 53 GB, heavy columns 33, centred 30; ncu: sweep
  62, centred 48, and centred the fastest, -3.4%), not the older orders (it puts v3.12's locality order below
  heaviest first at every capacity; ncu measured it 20 GB above), and not the bytes: a guide, not a prediction.

    python3 scripts/l2_order_model.py [--cache partitions] [--l2-mb 30] [--dirty-mb 12] [--rows 1,wan]
"""
import argparse
import collections
import heapq

WINDOW, QUERY_BLOCKS, KEY_UNITS, CTAS, BLOCK_KB = 3, 6, 3, 132, 32


def query_tiles(grid, window=WINDOW):
    """For each key tile, the query tiles whose (border-shifted) window contains it, in raster order."""
    def start(c, n):
        return min(max(c - window // 2, 0), max(n - window, 0))

    def sees(q, k, n):
        return start(q, n) <= k < start(q, n) + window

    tiles = [(t, h, w) for t in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])]
    return tiles, {k: [q for q in tiles if all(sees(q[a], k[a], grid[a]) for a in range(3))] for k in tiles}


# Item orders: name -> (sort key of (head, key tile) given the loads and the head count, whether the walk is w slowest).
def _last_head_heaviest(h, k, load, heads):
    return -load[k] if h == heads - 1 else 0


ORDERS = {
    # v3.2, the default where the sweep is not taken: every head's heaviest key tiles first
    "heaviest-first": (lambda h, k, load, heads: (-load[k], h, k), False),
    # v3.12: per head the largest axis (w) slowest, raster walk; the last head heaviest first
    "locality": (lambda h, k, load, heads: (h, _last_head_heaviest(h, k, load, heads), k[2], k[0], k[1]), False),
    # v3.26, the default on row 1 and Wan: per head w slowest, then h, t fastest; walk w slowest
    "sweep": (lambda h, k, load, heads: (h, _last_head_heaviest(h, k, load, heads), k[2], k[1], k[0]), True),
    # per head w slowest, heaviest first within a column of key tiles; walk w slowest
    "sweep-columns-heaviest": (
        lambda h, k, load, heads: (h, _last_head_heaviest(h, k, load, heads), k[2], -load[k], k[1], k[0]), True),
}


def centred_order(items, load, heads, ctas=CTAS):
    """Per head w slowest, each unit started so that the middle of its run (where it visits query column w) falls
    where its key column's middle falls if key columns advance at the machine's rate: start = T_w - load / 2."""
    per_column = collections.defaultdict(int)
    for h, k in items:
        per_column[(h, k[2])] += KEY_UNITS * load[k]
    t, centre = 0.0, {}
    for h in range(heads):
        for w in sorted({k[2] for hh, k in items if hh == h}):
            centre[(h, w)] = t + per_column[(h, w)] / ctas / 2
            t += per_column[(h, w)] / ctas
    return sorted(items, key=lambda it: (1, -load[it[1]]) if it[0] == heads - 1 else
                  (0, centre[(it[0], it[1][2])] - load[it[1]] / 2))


class Lru:
    def __init__(self, l2_mb, **_):
        self.cache, self.capacity = collections.OrderedDict(), int(l2_mb * 1024 / (2 * BLOCK_KB))
        self.visits = self.misses = 0

    def visit(self, cta, h, q, b):
        key = (h, q, b)
        self.visits += 1
        if key in self.cache:
            self.cache.move_to_end(key)
        else:
            self.misses += 1
            self.cache[key] = True
            if len(self.cache) > self.capacity:
                self.cache.popitem(last=False)

    def summary(self):
        return f"{100 * self.misses / self.visits:.1f}% of visits miss"


class Partitions:
    """Two halves of the L2 in 16 KB lines; see the module docstring."""
    LINE_KB = 16

    def __init__(self, l2_mb, dirty_mb, **_):
        self.capacity = int(l2_mb / 2 * 1024 / self.LINE_KB)
        self.dirty_cap = int(dirty_mb / 2 * 1024 / self.LINE_KB)
        self.lines = [collections.OrderedDict() for _ in range(2)]  # line -> dirty?
        self.dirty = [collections.OrderedDict() for _ in range(2)]  # dirty lines, least recently dirtied first
        self.read_lines = self.written_lines = 0

    def _touch(self, half, line, reduce):
        lines, dirty = self.lines[half], self.dirty[half]
        if line in lines:
            lines.move_to_end(line)
        else:
            self.read_lines += 1
            lines[line] = True
            if len(lines) > self.capacity:
                old, _ = lines.popitem(last=False)
                if old in dirty:
                    del dirty[old]
                    self.written_lines += 1
        if reduce:
            dirty[line] = True
            dirty.move_to_end(line)
            if len(dirty) > self.dirty_cap:
                dirty.popitem(last=False)
                self.written_lines += 1

    def visit(self, cta, h, q, b):
        near = cta % 2
        for part in (0, 1):  # Q and dO: 32 KB, copied into the reading CTA's half
            self._touch(near, ("r", h, q, b, part), False)
        for half in (0, 1):  # the accumulator's 32 KB, half of its lines homed in each half
            self._touch(half, ("a", h, q, b), True)

    def summary(self, scale=1.0):
        gb = self.LINE_KB / 1024 / 1024 * scale
        return f"DRAM {self.read_lines * gb:.1f} GB read / {self.written_lines * gb:.1f} GB written"


def simulate(grid, heads, order, cache):
    tiles, seen_by = query_tiles(grid)
    load = {k: len(v) for k, v in seen_by.items()}
    items = [(h, k) for h in range(heads) for k in tiles]
    if order == "centred":
        items, walk_w = centred_order(items, load, heads), True
    else:
        key, walk_w = ORDERS[order]
        items.sort(key=lambda it: key(it[0], it[1], load, heads))
    work = [it for it in items for _ in range(KEY_UNITS)]
    walks = {k: sorted(v, key=lambda q: (q[2], q[1], q[0])) if walk_w else v for k, v in seen_by.items()}
    streams, taken, end, visits = {}, 0, 0, 0

    def stream(h, k):  # a function, not a generator expression: h must not be read late, after the next item
        for q in walks[k]:
            for b in range(QUERY_BLOCKS):
                yield h, q, b

    clock = [(0, c) for c in range(CTAS)]
    while clock:
        now, c = heapq.heappop(clock)
        end = max(end, now)
        block = next(streams[c], None) if c in streams else None
        if block is None:
            if taken == len(work):
                continue
            streams[c] = stream(*work[taken])
            taken += 1
            block = next(streams[c])
        visits += 1
        cache.visit(c, *block)
        heapq.heappush(clock, (now + 1, c))
    return end / (visits / CTAS) - 1


ROWS = {"1": ("Hunyuan 30x48x80 w3x3x3", (5, 6, 10), 24), "partial": ("Hunyuan 33x45x80", (6, 6, 10), 24),
        "wan": ("Wan2.1 21x45x80", (4, 6, 10), 40)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", choices=("lru", "partitions"), default="partitions")
    ap.add_argument("--l2-mb", type=float, default=30.0)
    ap.add_argument("--dirty-mb", type=float, default=12.0)
    ap.add_argument("--rows", default="1,wan", help="comma-separated keys of ROWS")
    ap.add_argument("--orders", default=",".join(list(ORDERS) + ["centred"]), help="comma-separated")
    ap.add_argument("--heads", type=int, default=0, help="simulate this many heads and scale (0: the row's)")
    args = ap.parse_args()
    print(f"cache {args.cache}, L2 {args.l2_mb} MB, dirty limit {args.dirty_mb} MB\n")
    print("| row | order | L2 | tail over ideal |\n|---|---|---|---|")
    for row in args.rows.split(","):
        name, grid, heads = ROWS[row]
        sim_heads = args.heads or heads
        for order in args.orders.split(","):
            cache = (Lru if args.cache == "lru" else Partitions)(l2_mb=args.l2_mb, dirty_mb=args.dirty_mb)
            tail = simulate(grid, sim_heads, order, cache)
            summary = cache.summary() if args.cache == "lru" else cache.summary(heads / sim_heads)
            print(f"| {name} | {order} | {summary} | +{100 * tail:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
