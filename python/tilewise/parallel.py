"""Sequence parallelism (Ulysses) over torch.distributed: tile-sparse attention on a sequence split across the ranks
of a process group.

    import torch.distributed as dist, tilewise.parallel as twp
    dist.init_process_group("nccl")                    # torchrun --nproc-per-node N
    lo, hi = twp.shard_range(S, dist.get_rank(), dist.get_world_size())
    o_local = twp.ulysses_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], group=dist.group.WORLD,
                                    latent=(30, 48, 80), tile=(6, 8, 8), window=per_head_windows, text_len=256)

Sharding (docs/semantics.md, "Sequence-parallel sharding"): rank r of a group of P holds the positions
[r*c, min(S, (r+1)*c)) of the joint sequence (video and text in the spec's order), c = ceil(S / P); the last ranks
may hold fewer positions, or none. The output comes back sharded the same way.

What runs (Ulysses, as in DeepSpeed-Ulysses / xDiT): one all-to-all turns sequence-sharded q, k, v into
head-sharded ones (every rank then holds the whole sequence for H/P heads), tilewise runs there with the per-head
pattern indexed by the global head (`head_offset`), and one all-to-all brings the output back to sequence shards.
The collectives are torch.distributed's own (functional collectives: `all_to_all_single_autograd`), so the
transport is NCCL on GPUs and gloo on CPUs, autograd flows through them (the backward of an all-to-all is the
reverse all-to-all), and torch.compile traces them.

Per-head load balance: calibrated strategies give heads very different costs. With `load_balance` on (the default
when the pattern differs between heads), the heads are assigned to ranks by the library's own FLOP count of each
head (a one-head Plan per global head, `tw_plan_flops`) so that the most loaded rank is close to the mean; the head
permutation is applied while packing the first all-to-all and undone while unpacking the last, so outputs keep the
original head order.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from tilewise import _api, _args, _capi, _copy_engine, _torch

__all__ = ["ulysses_attention", "shard_range", "shard_sizes", "shard", "gather", "head_assignment", "head_costs"]


# --- sharding ---

def shard_sizes(seq_len, world_size) -> list:
    """Positions held by each of `world_size` ranks: chunks of c = ceil(S / P), the last ones shorter (or empty)."""
    S, P = _args.integer("seq_len", seq_len), _args.integer("world_size", world_size)
    if P < 1:
        raise ValueError(f"invalid world_size = {P}: expected at least 1")
    if S < 0:
        raise ValueError(f"invalid seq_len = {S}: expected at least 0")
    c = -(-S // P)
    return [max(0, min(c, S - r * c)) for r in range(P)]


def shard_range(seq_len, rank, world_size) -> tuple:
    """(start, stop) of the positions rank `rank` holds: [r*c, min(S, (r+1)*c)), c = ceil(S / P)."""
    P = _args.integer("world_size", world_size)
    r = _args.integer("rank", rank)
    if not 0 <= r < P:
        raise ValueError(f"invalid rank = {r}: expected 0 to world_size - 1 = {P - 1}")
    sizes = shard_sizes(seq_len, P)
    start = sum(sizes[:r])
    return start, start + sizes[r]


def shard(x: torch.Tensor, group=None, *, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of a full tensor along `dim` (the sequence dimension: 1 for [B, S, H, D], 2 for
    [B, H, S, D]), a view."""
    rank, world = _group_rank(group), _group_size(group)
    lo, hi = shard_range(x.shape[dim], rank, world)
    return x.narrow(dim, lo, hi - lo)


def gather(x: torch.Tensor, group=None, *, dim: int = 1, seq_len=None) -> torch.Tensor:
    """The full tensor on every rank from the ranks' chunks along `dim` (shard's inverse; a collective of the group).
    seq_len: the full length, if known (else the chunk lengths are gathered first). Chunks differ in length where
    the group's size does not divide seq_len, and all_gather takes equal sizes (unequal ones make NCCL wait forever),
    so each travels padded to the longest."""
    P = _group_size(group)
    sizes = _local_sizes(x.shape[dim], seq_len, P, group, x.device)
    rank = _group_rank(group)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"invalid x with {x.shape[dim]} positions along dim {dim} on rank {rank}: expected "
                         f"{sizes[rank]} (shard_sizes({sum(sizes)}, {P}))")
    shape = list(x.shape)
    shape[dim] = max(sizes)
    padded = x.new_zeros(shape)
    padded.narrow(dim, 0, x.shape[dim]).copy_(x)
    chunks = [torch.empty_like(padded) for _ in range(P)]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([c.narrow(dim, 0, n) for c, n in zip(chunks, sizes)], dim=dim)


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _group_rank(group) -> int:
    return dist.get_rank(group)


# --- per-head cost and assignment ---

def _global_heads(params: _args.PatternParams, latent, tile) -> Optional[int]:
    """How many global heads the pattern table describes (None: one entry for every head)."""
    if params.pattern == "sliding_tile":
        n = len(params.windows)
    elif params.pattern == "attention_tile":
        n = len(params.global_frames)
    elif params.pattern == "block_list":
        tiles = _capi.tile_grid(latent, tile)
        n = (len(params.block_offsets) - 1) // (tiles[0] * tiles[1] * tiles[2])
    else:
        return None
    return None if n == 1 else n


def _per_head_entries(params: _args.PatternParams, latent, tile, heads: int) -> list:
    """A hashable description of each global head's pattern (equal entries cost the same)."""
    if params.pattern == "sliding_tile":
        ws = params.windows if len(params.windows) > 1 else params.windows * heads
        return [_capi.effective_window(latent, tile, w) for w in ws]  # windows past the grid are the same head
    if params.pattern == "attention_tile":
        g, r = params.global_frames, params.radius or (0,)
        g = g if len(g) > 1 else g * heads
        r = r if len(r) > 1 else r * heads
        return list(zip(g, r))
    if params.pattern == "block_list" and _global_heads(params, latent, tile) is not None:
        tiles = _capi.tile_grid(latent, tile)
        n = tiles[0] * tiles[1] * tiles[2]
        off, bt = params.block_offsets, params.block_tiles
        return [tuple(bt[off[h * n]:off[(h + 1) * n]]) + tuple(off[h * n:(h + 1) * n + 1])
                for h in range(heads)]
    return [()] * heads


@functools.lru_cache(maxsize=256)
def _head_costs(params: _args.PatternParams, latent, tile, text_capacity: int, text_position: str, heads: int,
                head_dim: int) -> tuple:
    # One single-head CPU plan per distinct head pattern, asked for its FLOPs: the cost model is the library's
    # (the allowed pairs of the mask, text included), not a re-derivation here. CPU plans upload nothing.
    per_head = _global_heads(params, latent, tile) is not None
    seq = latent[0] * latent[1] * latent[2] + text_capacity
    ops = _args.Operands(1, seq, 1, 1, head_dim, "f32", text_capacity, ((0, 0, 0, 1),) * 3)
    cost_of, costs = {}, []
    for h, entry in enumerate(_per_head_entries(params, latent, tile, heads)):
        if entry not in cost_of:
            call = _args.Call(latent, tile, _table_prefix(params, h + 1, latent, tile), text_position, "raster",
                              "bshd", 0.0, h if per_head else 0)
            cost_of[entry] = _args.make_plan(ops, call, "cpu").flops()
        costs.append(cost_of[entry])
    return tuple(costs)


def head_costs(heads, *, latent, tile=(6, 8, 8), pattern="sliding_tile", window=(3, 3, 3), global_frames=1,
               radius=0, block_offsets=None, block_tiles=None, text_capacity=0, text_position="last",
               head_dim=128) -> list:
    """FLOPs of one batch element of each global head (the library's count of allowed pairs, 4 * D per pair)."""
    params = _args.PatternParams.of(pattern, window, global_frames, radius, block_offsets, block_tiles)
    latent, tile = _args.triple("latent", latent), _args.triple("tile", tile)
    H = _args.integer("heads", heads)
    _check_table(params, latent, tile, H)
    return list(_head_costs(params, latent, tile, _args.integer("text_capacity", text_capacity),
                            _args.choice("text_position", text_position, _capi.TEXT_POSITIONS), H,
                            _args.integer("head_dim", head_dim)))


def head_assignment(costs: Sequence[float], world_size: int, group_size: int = 1) -> list:
    """A permutation of the heads (a list of global head indices, rank-major: rank r runs perm[r*h : (r+1)*h],
    h = heads / P) that keeps the most loaded rank close to the mean load.

    group_size: query heads that must stay together (grouped-query attention: the heads that read one kv head).
    Every rank gets the same number of heads (the all-to-all splits heads evenly). Greedy largest-first onto the
    least loaded rank with room, then pairwise swaps that even out two ranks while one exists. With
    equal head counts per rank the optimum can sit above the mean when a few heads dominate (e.g. 8 ranks of 3
    heads, one of them a whole-grid head). Deterministic, so
    every rank computes the same permutation. Returns the identity when it is not better than the identity."""
    P, G = _args.integer("world_size", world_size), _args.integer("group_size", group_size)
    H = len(costs)
    if P < 1 or G < 1 or H % (P * G):
        raise ValueError(f"invalid heads = {H}: expected a multiple of world_size * group_size = {P} * {G}")
    units = H // G
    per_rank = units // P
    unit_cost = [float(sum(costs[u * G:(u + 1) * G])) for u in range(units)]
    identity = list(range(H))
    if len(set(unit_cost)) <= 1 or P == 1:
        return identity

    bins = [[] for _ in range(P)]
    load = [0.0] * P
    for u in sorted(range(units), key=lambda u: (-unit_cost[u], u)):
        r = min((r for r in range(P) if len(bins[r]) < per_rank), key=lambda r: (load[r], r))
        bins[r].append(u)
        load[r] += unit_cost[u]
    # Local search: move load from a heavier rank to a lighter one by swapping one unit each way whenever the
    # swap narrows the pair's gap (d < load_a - load_b), taking the swap that lowers the pair's maximum most.
    # Every accepted swap strictly lowers the sum of squared loads, so this ends; the bound is a safety net.
    for _ in range(4 * units * units):
        best = None
        for a in range(P):
            for b in range(P):
                gap = load[a] - load[b]
                if gap <= 0:
                    continue
                for i in bins[a]:
                    for j in bins[b]:
                        d = unit_cost[i] - unit_cost[j]
                        if 0 < d < gap:
                            gain = min(d, gap - d)
                            if best is None or gain > best[0]:
                                best = (gain, a, b, i, j, d)
        if best is None or best[0] <= 1e-12 * max(load):
            break
        _, a, b, i, j, d = best
        bins[a][bins[a].index(i)], bins[b][bins[b].index(j)] = j, i
        load[a] -= d
        load[b] += d

    identity_max = max(sum(unit_cost[r * per_rank:(r + 1) * per_rank]) for r in range(P))
    if max(load) >= identity_max:
        return identity
    return [u * G + g for r in range(P) for u in sorted(bins[r]) for g in range(G)]


def _check_table(params: _args.PatternParams, latent, tile, heads: int) -> None:
    n = _global_heads(params, latent, tile)
    if n is not None and n != heads:
        what = {"sliding_tile": "window", "attention_tile": "global_frames",
                "block_list": "block_offsets"}[params.pattern]
        raise ValueError(f"invalid {what} with {n} heads: expected one entry for every head or one per global head "
                         f"({heads}), indexed by the global head")


def _permuted_params(params: _args.PatternParams, perm: list, latent, tile) -> _args.PatternParams:
    """The per-head table re-indexed so that entry i is the original head perm[i]."""
    if params.pattern == "sliding_tile" and len(params.windows) > 1:
        return params._replace(windows=tuple(params.windows[h] for h in perm))
    if params.pattern == "attention_tile" and len(params.global_frames) > 1:
        r = params.radius if len(params.radius) > 1 else params.radius * len(params.global_frames)
        return params._replace(global_frames=tuple(params.global_frames[h] for h in perm),
                               radius=tuple(r[h] for h in perm))
    if params.pattern == "block_list" and _global_heads(params, latent, tile) is not None:
        tiles = _capi.tile_grid(latent, tile)
        n = tiles[0] * tiles[1] * tiles[2]
        off, bt = params.block_offsets, params.block_tiles
        new_off, new_bt = [0], []
        for h in perm:
            for t in range(n):
                new_bt.extend(bt[off[h * n + t]:off[h * n + t + 1]])
                new_off.append(len(new_bt))
        return params._replace(block_offsets=tuple(new_off), block_tiles=tuple(new_bt))
    return params


def _table_prefix(params: _args.PatternParams, n: int, latent, tile) -> _args.PatternParams:
    """The first n global heads of a per-head table. The library takes a table of exactly q_heads entries at
    head_offset 0 and at least head_offset + q_heads elsewhere (a longer table at offset 0 is refused as the
    likely mistake it is outside sequence parallelism), so every rank passes the global table up to its last
    head: indices stay global, rank 0 included."""
    if _global_heads(params, latent, tile) is None:
        return params
    if params.pattern == "sliding_tile":
        return params._replace(windows=params.windows[:n])
    if params.pattern == "attention_tile":
        r = params.radius if len(params.radius) > 1 else params.radius * len(params.global_frames)
        return params._replace(global_frames=params.global_frames[:n], radius=r[:n])
    tiles = _capi.tile_grid(latent, tile)
    off = params.block_offsets[:n * tiles[0] * tiles[1] * tiles[2] + 1]
    return params._replace(block_offsets=off, block_tiles=params.block_tiles[:off[-1]])


# --- the collectives ---

def _all_to_all(x: torch.Tensor, output_split_sizes: list, input_split_sizes: list, group) -> torch.Tensor:
    """all_to_all_single along dim 0 with autograd (its backward is the reverse all-to-all). The functional
    collective returns at once (an AsyncCollectiveTensor that waits where it is first used), so collectives issued
    back to back overlap the compute between them on NCCL, and torch.compile traces it."""
    from torch.distributed import _functional_collectives as funcol
    return funcol.all_to_all_single_autograd(x, output_split_sizes, input_split_sizes, group)


def _chunks(n_units: int, chunks: int) -> list:
    """`chunks` near-equal, non-empty ranges of units."""
    chunks = max(1, min(chunks, n_units))
    base, extra = divmod(n_units, chunks)
    out, start = [], 0
    for i in range(chunks):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


class _SequenceSplit(NamedTuple):
    """How the ranks' local sequences make up the joint sequence in the spec's order.

    Rank r holds main[r] positions of the main part and, where the extra part is split apart from it (diffusers
    splits the text and the video separately), extra[r] positions of the extra part: [main | extra] locally, or
    [extra | main] with extra_first_locally. The spec's order is [main of ranks 0..P-1 | extra of ranks 0..P-1],
    or the extra part first with extra_first (text_position "first"). The public op's split is one main part:
    the spec's chunks of the whole joint sequence.

    The input all-to-all delivers the ranks' blocks in rank order, so every rank receives the gathered sequence
    in the spec's order (no reordering copy) when the extra part travels in one block: it is first gathered on
    the collector (the last rank; the first with extra_first), whose block is [its main chunk | whole extra
    part] ([whole extra part | its main chunk]); on the way back the collector scatters the extra part's output
    rows to their ranks. Two small all-to-alls of the extra part's rows (all heads) per call."""
    main: tuple
    extra: tuple = ()
    extra_first: bool = False
    extra_first_locally: bool = False

    @property
    def collector(self) -> int:
        return 0 if self.extra_first else len(self.main) - 1

    def local_len(self, rank: int) -> int:
        return self.main[rank] + (self.extra[rank] if self.extra else 0)

    def extra_in_block(self, rank: int) -> int:
        """Extra-part positions in rank's block: the whole extra part on the collector, none elsewhere."""
        return sum(self.extra) if rank == self.collector else 0

    def block(self, rank: int) -> int:
        """Positions of the gathered sequence that rank `rank` sends (every rank its heads of them)."""
        return self.main[rank] + self.extra_in_block(rank)

    def local_starts(self, rank: int) -> tuple:
        """(main start, extra start) in rank's local sequence."""
        e = self.extra[rank] if self.extra else 0
        return (e, 0) if self.extra_first_locally else (0, self.main[rank])

    def block_starts(self, rank: int) -> tuple:
        """(main start, extra start) in rank's block."""
        return (self.extra_in_block(rank), 0) if self.extra_first else (0, self.main[rank])


class Producer:
    """A part of q, k or v, [B, n, H, D] (bshd), not yet computed: its last kernel writes straight into its slot of
    the input all-to-all's send buffer (`write`), so that the packing copy disappears into it (the diffusers path
    without autograd: HunyuanVideo's RoPE; on 2 H200s the packing and unpacking copies were ~115 ms of a 3.1 s
    forward that do not halve, docs/bench/h200x2-parallel-v3.md). Paths that need a tensor call `materialize()`.
    Not differentiable: made only where autograd is off."""

    requires_grad = False

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def dim(self) -> int:
        return len(self.shape)

    def write(self, dst: torch.Tensor, P: int, lo: int, hi: int) -> None:
        """Heads [lo, hi) of each of the P head blocks into dst, [B, n, P, hi - lo, D] (a strided view)."""
        raise NotImplementedError

    def materialize(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.write(out.unflatten(2, (1, -1)), 1, 0, self.shape[2])
        return out


class _HeadsOf(NamedTuple):
    """Heads [lo, hi) of each of P head blocks of a Producer: a source of _Assemble (written, not copied)."""
    producer: Producer
    P: int
    lo: int
    hi: int

    @property
    def dtype(self):
        return self.producer.dtype

    @property
    def device(self):
        return self.producer.device

    def write(self, dst: torch.Tensor) -> None:
        self.producer.write(dst, self.P, self.lo, self.hi)


def _tensor(t) -> torch.Tensor:
    return t.materialize() if isinstance(t, Producer) else t


class _SequenceParts:
    """q, k or v of this rank as the local parts of its split, not joined: [main, extra] ([extra, main] with
    extra_first_locally), each [B, n, H, D] (bshd) or a Producer of one. diffusers' HunyuanVideo makes the video
    part (after RoPE) and the text part apart; the input all-to-all packs each straight into its slot of the send
    buffer (a Producer writes itself there), where joining them first would cost one more full-size copy of q, k
    and v. Only what _ulysses asks of a tensor."""

    def __init__(self, parts):
        self.parts = tuple(parts)

    @property
    def shape(self) -> tuple:
        B, _, H, D = self.parts[0].shape
        return (B, sum(p.shape[1] for p in self.parts), H, D)

    @property
    def dtype(self):
        return self.parts[0].dtype

    @property
    def device(self):
        return self.parts[0].device

    def dim(self) -> int:
        return 4 if all(p.dim() == 4 for p in self.parts) and len({(p.shape[0], *p.shape[2:]) for p in self.parts}) == 1 \
            else -1

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """The part at [start, start + length) of the sequence (the split's parts are the parts), else a view of the
        joined tensor (never on the diffusers path)."""
        at = 0
        for p in self.parts:
            if at == start and p.shape[1] == length:
                return p
            at += p.shape[1]
        return self.joined().narrow(dim, start, length)

    def index_select(self, dim: int, index: torch.Tensor) -> "_SequenceParts":
        return _SequenceParts(_tensor(p).index_select(dim, index) for p in self.parts)

    def joined(self) -> torch.Tensor:
        return torch.cat([_tensor(p) for p in self.parts], dim=1)


class _Assemble(torch.autograd.Function):
    """A new tensor of `shape` made of the sources: slot i is the view slot_i(out) (view ops only), written with
    one copy of source i, or with an index as slot_i(out)[:, :, index_i] = source i (heads put back in place), or
    by source i itself where it is a Producer's heads (_HeadsOf; no autograd then).
    One copy of each source also where the slots do not tile the tensor along one dimension (torch.cat and
    torch.stack would copy twice there), and a backward of views of the gradient (autograd's own in-place copies
    into slices clone the whole tensor once per slot in the backward). The slots must cover the tensor."""

    @staticmethod
    def forward(ctx, shape, slots, *sources):
        out = torch.empty(shape, dtype=sources[0].dtype, device=sources[0].device)
        for (slot, index), source in zip(slots, sources):
            if isinstance(source, _HeadsOf):
                source.write(slot(out))
            elif index is None:
                slot(out).copy_(source)
            else:
                slot(out)[:, :, index] = source
        ctx.slots = slots
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, None) + tuple(slot(grad) if index is None else slot(grad)[:, :, index]
                                    for slot, index in ctx.slots)


def _send_slot(buf: torch.Tensor, start: int, rows: int, c: int) -> torch.Tensor:
    """Rows [start, start + rows) of tensor c in a send buffer [P, block, C, B, h, D]: [B, rows, P, h, D]."""
    return buf[:, start:start + rows, c].permute(2, 1, 0, 3, 4)


def _output_slot(out: torch.Tensor, layout: str, start: int, rows: int, heads) -> torch.Tensor:
    """Rows [start, start + rows) of the output (seen as [B, s, H, D]): with heads = (P, lo, hi), heads [lo, hi)
    of every rank's head block, [B, rows, P, hi - lo, D]; with heads None, all heads [B, rows, H, D]."""
    x = (out.transpose(1, 2) if layout == "bhsd" else out).narrow(1, start, rows)
    if heads is None:
        return x
    P, lo, hi = heads
    return x.unflatten(2, (P, -1))[:, :, :, lo:hi]


@functools.lru_cache(maxsize=64)
def _original_heads(perm: tuple, P: int, device) -> torch.Tensor:
    """[P, H / P]: the original head of each head of each rank's block in the load-balanced order."""
    return torch.tensor(perm, dtype=torch.long, device=device).view(P, -1)


# SMs the attention leaves free for the collectives (FlashAttention-3's sm_margin): with chunks > 1 a head group's
# all-to-alls should run beside another group's attention, which the persistent kernel prevents by filling every
# SM. Passed to every head group's attention unchanged (Problem::sm_margin); the diffusers integration passes it
# through from tilewise.diffusers.enable(sm_margin=).
def _sm_margin(value) -> int:
    """A checked sm_margin, refused before any collective (and by enable() before the first call) rather than by
    the library at the first attention."""
    sm_margin = _args.integer("sm_margin", value)
    if sm_margin < 0:
        raise ValueError(f"invalid sm_margin = {sm_margin}: expected at least 0")
    return sm_margin


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, latent, tile=(6, 8, 8),
                      pattern: str = "sliding_tile", window=(3, 3, 3), global_frames=1, radius=0,
                      block_offsets=None, block_tiles=None, text_len=None, text_position: str = "last",
                      order: str = "raster", layout: str = "bshd", scale: Optional[float] = None,
                      load_balance: Optional[bool] = None, chunks: int = 1, deterministic: Optional[bool] = None,
                      seq_len: Optional[int] = None, sm_margin: int = 0, precision: str = "native",
                      exchange: str = "nccl"):
    """Tile-sparse attention over a sequence split across the ranks of `group` (None = the default group).

    q, k, v: this rank's chunk of the joint sequence, [B, s_r, H, D] (layout "bshd") or [B, H, s_r, D] ("bhsd"),
    s_r = the positions [r*c, min(S, (r+1)*c)) with c = ceil(S / P). Every rank passes the same arguments
    otherwise. S is the sum of the chunks: pass seq_len=S to skip the one all-gather of the local lengths (and to
    make the call free of host synchronisation); without it the lengths are exchanged once per call.
    pattern: "sliding_tile" (window: one or one per global head), "attention_tile" (global_frames / radius),
    "block_list" (block_offsets / block_tiles, CSR over global heads) or "dense"; latent, tile, text_len (global:
    per batch element, over the whole text), text_position, order, scale as for the single-device functions.
    load_balance: assign heads to ranks by their FLOPs (None = when the pattern differs between heads).
    chunks: split each rank's heads into this many groups, each with its own all-to-alls, so that the
    communication of one group overlaps the attention of another (1 = one all-to-all in, one out).
    sm_margin: SMs the attention kernels leave free for the collectives (0 = none; FlashAttention-3's sm_margin),
    so that with chunks > 1 NCCL's kernels can run beside the attention; the result does not change.
    precision: "native" or "fp8" (docs/semantics.md §11; each rank quantises the whole sequence of its heads, so
    the result equals the single-device one).
    exchange: "nccl" (torch.distributed's all-to-all) or "copy_engine": the head exchanges as copy-engine transfers
    into the peers' symmetric memory, which take no SMs, so that with chunks > 1 a head group's exchange runs under
    another group's attention (tilewise/_copy_engine.py; CUDA tensors; leave sm_margin >= 1 for its barrier
    kernel). Inference only: a call with autograd through q, k, v (or under torch.compile) uses NCCL's. The result
    is the same.
    Returns this rank's chunk of the output, shaped like q, contiguous in `layout`.
    """
    return _ulysses(q, k, v, group=group, latent=latent, tile=tile, pattern=pattern, window=window,
                    global_frames=global_frames, radius=radius, block_offsets=block_offsets, block_tiles=block_tiles,
                    text_len=text_len, text_position=text_position, order=order, layout=layout, scale=scale,
                    load_balance=load_balance, chunks=chunks, deterministic=deterministic, seq_len=seq_len,
                    sm_margin=sm_margin, precision=precision, exchange=exchange)


EXCHANGES = ("nccl", "copy_engine")


def _collective_exchange(group, rank: int) -> Callable:
    """The all-to-all as a function of (send rows, counts[s][d]: rows rank s sends to rank d) -> (received rows in
    rank order, wait), by torch's functional collective (which waits by itself at the first use: wait is a no-op)."""
    def run(x: torch.Tensor, counts) -> tuple:
        return _all_to_all(x, [row[rank] for row in counts], list(counts[rank]), group), lambda: None
    return run


def _local_sizes(s_local: int, seq_len, P: int, group, device) -> list:
    if seq_len is not None:
        S = _args.integer("seq_len", seq_len)
        if S < 0:
            raise ValueError(f"invalid seq_len = {S}: expected at least 0")
        return shard_sizes(S, P)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(P)]
    dist.all_gather(sizes, torch.tensor([s_local], dtype=torch.int64, device=device), group=group)
    return [int(x.item()) for x in sizes]


def _ulysses(q, k, v, **kw) -> torch.Tensor:
    """ulysses_attention, plus what the diffusers integration needs (see _ulysses_start)."""
    return _ulysses_start(q, k, v, **kw)()


def _ulysses_start(q, k, v, *, group, latent, tile, pattern, window, global_frames, radius, block_offsets,
                   block_tiles, text_len, text_position, order, layout, scale, load_balance, chunks, deterministic,
                   seq_len, sm_margin=0, split: Optional[_SequenceSplit] = None,
                   precision: str = "native", exchange: str = "nccl") -> Callable[[], torch.Tensor]:
    """ulysses_attention up to the input all-to-alls, which it issues: returns finish(), the attention, the output
    all-to-alls and the unpacking. torch's functional collectives return before the transfer ends and wait at the
    first use of their result, so work queued between the two (e.g. a GEMM that does not need the attention)
    runs while the exchange is in flight. Plus what the diffusers integration needs: `split`, how the ranks' local
    sequences make up the spec's one when they are not the spec's chunks (diffusers splits video and text
    separately).

    Full-size copies per call on the common path (bshd, B = 1, G = 1, chunks = 1, no load balance), in units of
    one local q (s_r * H * D elements, = S * H / P * D): 4, each needed.
    - 3, packing q, k, v into one send buffer: the all-to-all sends one contiguous block per destination, and a
      destination's heads are strided in q.
    - 1, unpacking o into the output: the received buffer is [source rank, position, that rank's heads] and the
      output [position, heads], a transpose of the first two axes (a GEMM after it needs it contiguous anyway).
    q, k, v may also come as _SequenceParts (the diffusers path's video and text parts, not joined: the packing
    copy reads them where they are, so no concatenation precedes it).
    Nothing else: q, k, v are views of the receive buffer (the library takes any strides with a contiguous last
    dim), already in the spec's order (`_SequenceSplit`: no reordering, also under diffusers); the attention's
    output [B, S, h, D] is the return send buffer as it is; chunks > 1 and the load balance's inverse head
    permutation write into the output in the same one copy. Besides: the extra part's (text) rows, gathered and
    scattered through the collector (a few copies of a few hundred rows); with B > 1 o is transposed to
    [S, B, h, D] before sending (1); with load balance q, k, v are permuted before packing (3)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, (torch.Tensor, _SequenceParts)):
            raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
    _args.choice("layout", layout, _capi.LAYOUTS)
    _args.choice("precision", precision, _args.PRECISIONS)
    _args.choice("exchange", exchange, EXCHANGES)
    params = _args.PatternParams.of(pattern, window, global_frames, radius, block_offsets, block_tiles)
    latent, tile = _args.triple("latent", latent), _args.triple("tile", tile)
    if isinstance(q, _SequenceParts):  # the diffusers path: bshd parts, cast part by part
        cast = [_torch.autocast_operands(*t) for t in zip(q.parts, k.parts, v.parts)]
        q, k, v = (_SequenceParts(c[i] for c in cast) for i in range(3))
    else:
        q, k, v = _torch.autocast_operands(q, k, v)  # before the all-to-alls: under autocast they carry bf16, not fp32
    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("group: torch.distributed is not initialised: call torch.distributed."
                               "init_process_group() first, or pass a process group")
        group = dist.group.WORLD
    P, rank = _group_size(group), _group_rank(group)
    chunks = _args.integer("chunks", chunks)
    if chunks < 1:
        raise ValueError(f"invalid chunks = {chunks}: expected at least 1")
    sm_margin = _sm_margin(sm_margin)

    # [B, s, H, D] views whatever the layout (tilewise takes any strides with a contiguous last dimension).
    if isinstance(q, _SequenceParts) and layout != "bshd":
        raise ValueError(f"invalid layout = {layout!r} with sequence parts: expected 'bshd'")
    qs, ks, vs = (t.transpose(1, 2) if layout == "bhsd" else t for t in (q, k, v))
    for name, t in (("q", qs), ("k", ks), ("v", vs)):
        if t.dim() != 4:
            raise ValueError(f"invalid {name}.ndim = {t.dim()}: expected 4 ({layout} = {_args.layout_shape(layout)})")
    B, s_local, Hq, D = qs.shape
    Hkv = ks.shape[2]
    if tuple(ks.shape) != tuple(vs.shape) or ks.shape[0] != B or ks.shape[1] != s_local or ks.shape[3] != D:
        raise ValueError(f"invalid k/v shapes {tuple(k.shape)}, {tuple(v.shape)}: expected batch {B}, local sequence "
                         f"{s_local} and head dim {D} like q {tuple(q.shape)}, and k and v alike")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"invalid kv heads = {Hkv}: expected a divisor of q heads = {Hq} (grouped-query attention)")
    if Hq % P:
        raise ValueError(f"invalid q heads = {Hq}: expected a multiple of the group's world size {P} (Ulysses gives "
                         f"each rank heads / {P} heads)")
    if Hkv % P:
        raise ValueError(f"invalid kv heads = {Hkv}: expected a multiple of the group's world size {P} (Ulysses gives "
                         f"each rank kv heads / {P} kv heads)")
    spec_chunks = split is None  # the public op: the spec's chunks; the diffusers path passes diffusers' own
    if split is None:
        split = _SequenceSplit(tuple(_local_sizes(s_local, seq_len, P, group, q.device)))
    if len(split.main) != P or split.local_len(rank) != s_local:
        S = sum(split.main) + sum(split.extra)
        expected = split.local_len(rank) if len(split.main) == P else "?"
        raise ValueError(f"invalid q with {s_local} local positions on rank {rank}: expected {expected}, this "
                         f"rank's chunk [r*c, min(S, (r+1)*c)) of S = {S} with c = ceil(S / {P})")
    S = sum(split.main) + sum(split.extra)
    if spec_chunks and list(split.main) != shard_sizes(S, P):
        raise ValueError(f"invalid local sequence lengths {list(split.main)} across the group: expected "
                         f"{shard_sizes(S, P)}, chunks of c = ceil(S / P) = {-(-S // P)} positions in rank order "
                         f"(S = {S}, P = {P})")
    n_video = latent[0] * latent[1] * latent[2]
    if n_video > S:
        raise ValueError(f"invalid latent = {latent}: T*H*W = {n_video} exceeds the sequence length S = {S} (the "
                         "sum of the ranks' chunks)")
    _check_table(params, latent, tile, Hq)
    G = Hq // Hkv
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name}: {t.dtype} on {t.device}, expected q's {q.dtype} on {q.device}")
    if exchange == "copy_engine" and q.device.type != "cuda":
        raise ValueError(f"invalid exchange = 'copy_engine' with q on {q.device}: expected CUDA tensors (or "
                         "exchange='nccl')")
    if P == 1:  # nothing to exchange: the plain op, no copies
        q, k, v = (t.joined() if isinstance(t, _SequenceParts) else t for t in (q, k, v))
        o = _api._attention(q, k, v, params=params, latent=latent, tile=tile, text_len=text_len,
                            text_position=text_position, order=order, layout=layout, scale=scale, head_offset=0,
                            return_lse=False, deterministic=deterministic, precision=precision, sm_margin=sm_margin)
        return lambda: o

    if load_balance is None:
        load_balance = _global_heads(params, latent, tile) is not None and \
            len(set(_per_head_entries(params, latent, tile, Hq))) > 1
    perm = list(range(Hq))
    if load_balance:
        costs = _head_costs(params, latent, tile, S - n_video, text_position, Hq, D)
        perm = head_assignment(costs, P, G)
    identity = perm == list(range(Hq))
    if not identity:
        params = _permuted_params(params, perm, latent, tile)
        q_perm = torch.tensor(perm, dtype=torch.long, device=q.device)
        kv_perm = torch.tensor(perm[::G], dtype=torch.long, device=q.device) // G
        qs, ks, vs = qs.index_select(2, q_perm), ks.index_select(2, kv_perm), vs.index_select(2, kv_perm)

    hq, hk = Hq // P, Hkv // P  # local heads
    call_kw = dict(latent=latent, tile=tile, text_len=text_len, text_position=text_position, order=order,
                   layout="bshd", scale=scale, deterministic=deterministic, precision=precision, sm_margin=sm_margin)
    blocks = [split.block(j) for j in range(P)]  # positions of the gathered sequence from each rank, in rank order
    main_start, extra_start = split.local_starts(rank)
    sources = [(split.block_starts(rank)[0], [t.narrow(1, main_start, split.main[rank]) for t in (qs, ks, vs)])]
    if split.extra:
        chunk = [t.narrow(1, extra_start, split.extra[rank]) for t in (qs, ks, vs)]
        sources.append((split.block_starts(rank)[1], _gather_extra(chunk, split, rank, group)))
    # Head groups (whole kv groups, so GQA stays local), each with its own collectives; all input all-to-alls
    # are issued before the first attention so that later groups' communication overlaps earlier groups' compute.
    groups = _chunks(hk, chunks)
    a2a = _collective_exchange(group, rank)
    if exchange == "copy_engine" and _copy_engine.usable(
            [p for t in (qs, ks, vs) for p in (t.parts if isinstance(t, _SequenceParts) else (t,))]):
        exchanger = _copy_engine.Exchanger.of(group, q.device)
        exchanger.begin_call()
        a2a = exchanger.all_to_all
    inputs = [_send_heads(sources, blocks, rank, G, lo, hi, a2a) for lo, hi in groups]

    def finish() -> torch.Tensor:
        received, arrivals = [], []
        for (lo, hi), (qf, kf, vf, arrived) in zip(groups, inputs):
            arrived()
            # [S, B, h, D] -> [B, S, h, D] views; head_offset makes the library index the table by global head.
            qf, kf, vf = (t.permute(1, 0, 2, 3) for t in (qf, kf, vf))
            offset = rank * hq + lo * G
            o = _api._attention(qf, kf, vf, params=_table_prefix(params, offset + (hi - lo) * G, latent, tile),
                                head_offset=offset, return_lse=False, **call_kw)
            o = o.transpose(0, 1).contiguous()  # [S, B, h, D], the return send buffer: a view for B = 1, a copy else
            back, back_arrived = a2a(o, [blocks] * P)  # to sequence shards: rank s sends blocks[d] rows to d
            received.append(back.view(P, blocks[rank], B, (hi - lo) * G, D))
            arrivals.append(back_arrived)
        for arrived in arrivals:  # waited for only now, so that every group's attention was queued before
            arrived()
        head_ranges = [(lo * G, hi * G) for lo, hi in groups]
        return _receive_heads(received, head_ranges, split, rank, layout, None if identity else tuple(perm), group)

    return finish


def _gather_extra(chunk: list, split: _SequenceSplit, rank: int, group) -> list:
    """Every rank's extra-part chunk of q, k, v, gathered on the collector: [B, E, H, D] views of one buffer (E =
    the whole extra part, in rank order), [B, 0, H, D] on the other ranks (still part of the autograd graph, so
    that every rank runs the backward's all-to-all). One small all-to-all of all heads of q, k and v."""
    P = len(split.main)
    n, B, D = chunk[0].shape[1], chunk[0].shape[0], chunk[0].shape[3]
    widths = [t.shape[2] for t in chunk]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    slots = tuple((functools.partial(torch.narrow, dim=2, start=a, length=w), None) for a, w in zip(starts, widths))
    buf = _Assemble.apply((n, B, sum(widths), D), slots, *(t.transpose(0, 1) for t in chunk))  # [n, B, H, D]
    to_ranks = [n if j == split.collector else 0 for j in range(P)]
    from_ranks = list(split.extra) if rank == split.collector else [0] * P
    got = _all_to_all(buf, from_ranks, to_ranks, group)
    return [got.narrow(2, a, w).transpose(0, 1) for a, w in zip(starts, widths)]


def _send_heads(sources: list, blocks: list, rank: int, G: int, lo: int, hi: int, a2a: Callable) -> tuple:
    """The input all-to-all of kv heads [lo, hi) of every rank's head block (q heads [lo*G, hi*G)). sources:
    [(start in this rank's block, [q, k, v] views [B, n, H, D])]; a2a: the exchange (_collective_exchange or the
    copy engines'). Returns q, k, v of the gathered sequence (the spec's order) for those heads, [S, B, h, D] views
    each, and wait(): call it before reading them."""
    if G == 1:  # q, k, v alike: one collective for all three (fewer, larger messages)
        got, arrived = _exchange(sources, blocks, rank, lo, hi, a2a)
        return got[:, 0], got[:, 1], got[:, 2], arrived
    qf, q_arrived = _exchange([(at, ts[:1]) for at, ts in sources], blocks, rank, lo * G, hi * G, a2a)
    kv, kv_arrived = _exchange([(at, ts[1:]) for at, ts in sources], blocks, rank, lo, hi, a2a)
    return qf[:, 0], kv[:, 0], kv[:, 1], lambda: (q_arrived(), kv_arrived())


def _exchange(sources: list, blocks: list, rank: int, lo: int, hi: int, a2a: Callable) -> tuple:
    """Heads [lo, hi) of every rank's head block of the C tensors of `sources` ([(start in this rank's block,
    C views [B, n, H, D])]) packed by destination into [P, block, C, B, hi - lo, D] (rank j's heads first) with
    one copy, then the all-to-all. Returns ([S, C, B, hi - lo, D]: the ranks' blocks in rank order, wait)."""
    P, R = len(blocks), blocks[rank]
    first = sources[0][1]
    B, D, C = first[0].shape[0], first[0].shape[3], len(first)
    slots, parts = [], []
    for start, tensors in sources:
        for c, t in enumerate(tensors):
            slots.append((functools.partial(_send_slot, start=start, rows=t.shape[1], c=c), None))
            parts.append(_HeadsOf(t, P, lo, hi) if isinstance(t, Producer) else t.unflatten(2, (P, -1))[:, :, :, lo:hi])
    buf = _Assemble.apply((P, R, C, B, hi - lo, D), tuple(slots), *parts)
    return a2a(buf.view(P * R, C, B, hi - lo, D), [[blocks[s]] * P for s in range(P)])  # s sends its block to all


def _receive_heads(received: list, head_ranges: list, split: _SequenceSplit, rank: int, layout: str,
                   perm: Optional[tuple], group) -> torch.Tensor:
    """This rank's output, [B, s, H, D] contiguous in `layout`, from each head group's received rows
    [P, block, B, h, D] (source rank j's heads j*H/P + head_ranges[i] first), with one copy: the rows of the main
    chunk straight from the received blocks, those of the extra chunk after the collector scattered them. With
    load balance (perm: the original head of each head of the balanced order) the heads go back to their places in
    the same copy."""
    P, _, B, _, D = received[0].shape
    hq = sum(hi - lo for lo, hi in head_ranges)
    main_start, extra_start = split.local_starts(rank)
    main_at = split.block_starts(rank)[0]
    n_main = split.main[rank]
    parts = [(main_start, n_main, r.narrow(1, main_at, n_main).permute(2, 1, 0, 3, 4), heads)  # [B, n, P, h, D]
             for r, heads in zip(received, head_ranges)]
    if split.extra:
        rows = _scatter_extra(received, head_ranges, split, rank, group)  # [n, B, P, hq, D]
        parts.append((extra_start, split.extra[rank], rows.transpose(0, 1), (0, hq)))
    index = None if perm is None else _original_heads(perm, P, received[0].device)
    slots = tuple(
        (functools.partial(_output_slot, layout=layout, start=start, rows=n, heads=(P, lo, hi)), None)
        if index is None else
        (functools.partial(_output_slot, layout=layout, start=start, rows=n, heads=None), index[:, lo:hi])
        for start, n, _, (lo, hi) in parts)
    s = split.local_len(rank)
    shape = (B, P * hq, s, D) if layout == "bhsd" else (B, s, P * hq, D)
    return _Assemble.apply(shape, slots, *(source for _, _, source, _ in parts))


def _scatter_extra(received: list, head_ranges: list, split: _SequenceSplit, rank: int, group) -> torch.Tensor:
    """The output rows of this rank's extra-part chunk, [n, B, P, hq, D] (source rank j's heads first): the
    collector received every rank's (at its block's extra rows) and sends them back; one small all-to-all."""
    P, _, B, _, D = received[0].shape
    hq = sum(hi - lo for lo, hi in head_ranges)
    at, n = split.block_starts(rank)[1], split.extra_in_block(rank)
    slots = tuple((functools.partial(torch.narrow, dim=3, start=lo, length=hi - lo), None) for lo, hi in head_ranges)
    rows = _Assemble.apply((n, B, P, hq, D), slots, *(r.narrow(1, at, n).permute(1, 2, 0, 3, 4) for r in received))
    to_ranks = list(split.extra) if rank == split.collector else [0] * P
    from_ranks = [split.extra[rank] if j == split.collector else 0 for j in range(P)]
    return _all_to_all(rows, from_ranks, to_ranks, group)
