"""tilewise.parallel's exchange="copy_engine" (tilewise/_copy_engine.py). On the CPU: its offsets, simulated for
random group sizes and counts. On 2 GPUs with NCCL: bitwise the output of
exchange="nccl" (the transport differs, the kernels do not), with text split as diffusers splits it, chunks 1 and
2, load balance on (per-head windows), B = 2, and across consecutive calls (the regions are reused); under autograd
the NCCL path runs (gradients equal). Skipped without 2 CUDA GPUs of compute capability 9 (the device's
nvidia-h200-x2 kind runs it: NVLink multicast off, NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_parallel import exit_worker, launch  # noqa: E402

TWO_HOPPERS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and \
    all(torch.cuda.get_device_capability(i)[0] == 9 for i in range(2))


def _worker(rank: int, world: int, port: int, seed: int, out: str) -> None:
    import torch.distributed as dist
    import tilewise.parallel as twp
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    latent, tile, heads, D = (6, 16, 18), (2, 8, 6), 8, 128
    S = latent[0] * latent[1] * latent[2] + 40  # 40 text positions, 31 of them valid
    results = {}
    for name, B, chunks, windows in (("uniform", 1, 1, (3, 1, 3)), ("chunks2", 1, 2, (3, 1, 3)),
                                     ("per_head_b2", 2, 2, [(1, 1, 1), (3, 2, 3), (5, 2, 3), (1, 1, 3)] * 2)):
        full = [torch.randn(B, S, heads, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        lo, hi = twp.shard_range(S, rank, world)
        local = [t[:, lo:hi] for t in full]
        kw = dict(latent=latent, tile=tile, window=windows, text_len=[31] * B, seq_len=S, chunks=chunks,
                  sm_margin=1)
        with torch.no_grad():
            ref = twp.ulysses_attention(*local, exchange="nccl", **kw)
            got = [twp.ulysses_attention(*local, exchange="copy_engine", **kw) for _ in range(3)]  # regions reused
        torch.cuda.synchronize()
        results[name] = {"equal": [bool(torch.equal(g, ref)) for g in got],
                         "max_diff": max(float((g.float() - ref.float()).abs().max()) for g in got)}
    # autograd through q, k, v: NCCL's path (the copies are not differentiable), same gradients
    q, k, v = (t.detach().requires_grad_() for t in local)
    a = twp.ulysses_attention(q, k, v, exchange="copy_engine", deterministic=True, **kw)
    ga = torch.autograd.grad(a.float().square().sum(), (q, k, v))
    b = twp.ulysses_attention(q, k, v, exchange="nccl", deterministic=True, **kw)
    gb = torch.autograd.grad(b.float().square().sum(), (q, k, v))
    results["autograd"] = {"equal": [bool(torch.equal(a, b))] + [bool(torch.equal(x, y)) for x, y in zip(ga, gb)]}
    dist.barrier()
    dist.destroy_process_group()
    Path(out).write_text(json.dumps({"results": results}))


def test_pushes_land_every_row_once_in_rank_order():
    """The exchange's arithmetic, simulated for random group sizes and counts (zeros included): every rank's pushes
    put each row it sends to rank d exactly once inside d's region, and d's received rows are the sources' blocks
    for it in rank order (what NCCL's all_to_all_single returns)."""
    from tilewise._copy_engine import pushes, region_bytes
    rng = np.random.default_rng()
    for _ in range(200):
        P = int(rng.integers(2, 6))
        counts = rng.integers(0, 5, size=(P, P)) * (rng.random((P, P)) < 0.8)
        counts = [[int(c) for c in row] for row in counts]
        row_bytes = int(rng.integers(1, 4)) * 16
        region = region_bytes(counts, row_bytes)
        got = [[None] * (region // row_bytes) for _ in range(P)]
        for s in range(P):
            for d, offset, first, rows in pushes(counts, s, row_bytes):
                assert offset % row_bytes == 0 and offset + rows * row_bytes <= region, (counts, s, d)
                for r in range(rows):
                    slot = offset // row_bytes + r
                    assert got[d][slot] is None, ("written twice", counts, s, d, slot)
                    got[d][slot] = (s, first + r)  # (source, row of its destination-major send buffer)
        for d in range(P):
            expected = [(s, sum(counts[s][:d]) + r) for s in range(P) for r in range(counts[s][d])]
            assert got[d][:len(expected)] == expected, (counts, d)


@pytest.mark.skipif(not TWO_HOPPERS, reason="needs 2 CUDA Hopper GPUs (the device's nvidia-h200-x2 kind)")
def test_copy_engine_exchange_equals_nccl(tmp_path):
    seed = int(np.random.SeedSequence().entropy % (1 << 62))
    reports = launch(2, tmp_path, seed, timeout=300.0, worker=__file__)
    for rank, rep in enumerate(reports):
        for case, got in rep["results"].items():
            assert all(got["equal"]), (case, rank, seed, got)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(*map(int, sys.argv[2:6]), sys.argv[6])
    exit_worker()
