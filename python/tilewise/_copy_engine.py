"""The Ulysses all-to-alls by the GPUs' copy engines (tilewise.parallel's exchange="copy_engine"; inference).

Why not NCCL: NCCL's all-to-all runs as kernels, and the persistent attention kernel holds every SM, so an exchange
can hide neither under the attention of another head group (chunks > 1 measured slower, docs/bench/h200x2-parallel-v3.md)
nor, without taking SMs from them, under the MLP's GEMMs (early start: NCCL's kernels 388 ms against 254 ms on rank
0, the GEMMs 1020 against 981). Here each rank *pushes* its rows for rank d into rank d's receive region, a slice
of a symmetric-memory buffer (torch.distributed._symmetric_memory: every rank maps every other rank's buffer, no
multicast), with plain device-to-device copies of contiguous ranges, which CUDA runs on a copy engine, on a side
stream. torch's own micro-pipelined all-to-all (`_pipelined_produce_and_all2all`) is built the same way; it is not
used as it is because it takes one producer per destination and waits for the exchange on the calling stream.

Ordering, on the side stream of each exchange: wait for the calling stream (the rows to send are written, and every
reader of the receive region's previous contents is queued before this exchange, see `Exchanger.begin_call`), a
barrier of all ranks (so no rank writes into a region another still reads), the copies, a second barrier (every
rank's rows have arrived), an event. `wait()` makes the calling stream wait for that event where the rows are first
used, so work queued in between (another head group's attention, the MLP) runs during the transfer. The barrier is a
one-block kernel: beside the persistent attention it needs a free SM (sm_margin >= 1) to start before the attention
ends."""
from __future__ import annotations

import math
import threading
from typing import Sequence

import torch

_ALIGN = 256  # bytes: every region starts on this boundary (the copies' alignment)
# How long a rank's barrier kernel waits for the others before it traps (a CUDA error names the failure instead of
# a silent hang; a peer is late by at most a transformer block's work, well under a second here).
BARRIER_TIMEOUT_MS = 60_000


class _Pool:
    """Symmetric-memory buffers of one process group on one device, handed out as regions in the same order on
    every rank (the exchanges' shapes are the same on every rank, so are the offsets). Buffers are only added (a
    rendezvous each, a collective every rank makes at the same exchange), never freed: regions of earlier buffers
    may still be read in this call. After the first call of a given shape it allocates nothing."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self.buffers = []  # (tensor, handle, bytes)
        self.cursor = (0, 0)  # (buffer index, byte offset)

    def rewind(self) -> None:
        self.cursor = (0, 0)

    def take(self, nbytes: int) -> tuple:
        """(handle, byte offset) of a region of nbytes, the next one in this call's order."""
        from torch.distributed import _symmetric_memory as symm_mem
        index, offset = self.cursor
        nbytes = -(-nbytes // _ALIGN) * _ALIGN
        while index < len(self.buffers) and offset + nbytes > self.buffers[index][2]:
            index, offset = index + 1, 0
        if index == len(self.buffers):
            size = max(nbytes, 2 * (self.buffers[-1][2] if self.buffers else 0))
            tensor = symm_mem.empty(size, dtype=torch.uint8, device=self.device)
            self.buffers.append((tensor, symm_mem.rendezvous(tensor, self.group), size))
        self.cursor = (index, offset + nbytes)
        return self.buffers[index][1], offset


def region_bytes(counts: Sequence[Sequence[int]], row_bytes: int) -> int:
    """The receive region of one exchange, the same on every rank (so that the offsets agree everywhere): the
    largest receiver's rows. counts[s][d]: rows rank s sends to rank d."""
    P = len(counts)
    return max(sum(counts[s][d] for s in range(P)) for d in range(P)) * row_bytes


def pushes(counts: Sequence[Sequence[int]], rank: int, row_bytes: int) -> list:
    """What `rank` copies: (destination, byte offset in the destination's region, first row of the send buffer,
    rows) for each destination it sends rows to. The send buffer is destination-major; each receiver's region holds
    the sources' rows in rank order."""
    out, at = [], 0
    for d, rows in enumerate(counts[rank]):
        if rows:
            out.append((d, sum(counts[s][d] for s in range(rank)) * row_bytes, at, rows))
        at += rows
    return out


class Exchanger:
    """The copy-engine all-to-all of one process group: `all_to_all(send, counts)` -> (received, wait)."""

    _lock = threading.Lock()
    _by_group: dict = {}

    @classmethod
    def of(cls, group, device: torch.device) -> "Exchanger":
        key = (id(group), device)
        with cls._lock:
            if key not in cls._by_group:
                cls._by_group[key] = cls(group, device)
            return cls._by_group[key]

    def __init__(self, group, device: torch.device):
        import torch.distributed as dist
        from torch.distributed import _symmetric_memory as symm_mem
        symm_mem.enable_symm_mem_for_group(group.group_name)  # idempotent; older torch needs it before rendezvous
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.pool = _Pool(group, device)
        self.stream = torch.cuda.Stream(device=device)

    def begin_call(self) -> None:
        """Regions are reused from the start at each attention call: every reader of the previous call's regions
        (its attention, its output's unpacking) was queued on the calling stream before this call began, and each
        exchange's side stream waits for the calling stream, then for every rank, before writing."""
        self.pool.rewind()

    def all_to_all(self, send: torch.Tensor, counts: Sequence[Sequence[int]]) -> tuple:
        """send: this rank's rows, [sum_d counts[rank][d], ...] contiguous, destination-major; counts[s][d]: rows
        rank s sends to rank d (known on every rank). Returns (received [sum_s counts[s][rank], ...], the sources'
        rows in rank order, and wait(): makes the current stream wait for their arrival; call it before reading)."""
        P, rank = self.world, self.rank
        row_shape, dtype, elem = tuple(send.shape[1:]), send.dtype, send.element_size()
        row_bytes = math.prod(row_shape) * elem  # also where this rank sends no rows
        if not send.is_contiguous() or send.shape[0] != sum(counts[rank]):
            raise ValueError(f"send: expected {sum(counts[rank])} contiguous rows, got {tuple(send.shape)} "
                             f"(contiguous: {send.is_contiguous()})")
        handle, base = self.pool.take(max(region_bytes(counts, row_bytes), 1))
        caller = torch.cuda.current_stream(send.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(caller)
            send.record_stream(self.stream)
            handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
            for d, offset, first, rows in pushes(counts, rank, row_bytes):
                dst = handle.get_buffer(d, (rows, *row_shape), dtype, (base + offset) // elem)
                dst.copy_(send[first:first + rows])  # contiguous, same dtype: cudaMemcpyAsync on a copy engine
            handle.barrier(channel=1, timeout_ms=BARRIER_TIMEOUT_MS)
            arrived = torch.cuda.Event()
            arrived.record(self.stream)
        received = handle.get_buffer(rank, (sum(counts[s][rank] for s in range(P)), *row_shape), dtype, base // elem)

        def wait() -> None:
            torch.cuda.current_stream(received.device).wait_event(arrived)

        return received, wait


def usable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the copy-engine exchange can serve this call: CUDA tensors, no autograd through them (its copies
    are not differentiable: training keeps NCCL's all-to-all) and not under torch.compile's tracing."""
    return (all(t.is_cuda for t in tensors) and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling())

