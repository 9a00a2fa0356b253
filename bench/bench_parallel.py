#!/usr/bin/env python3
"""Sequence-parallel benchmark (issue 15): tilewise.parallel.ulysses_attention over NCCL, launched with

    torchrun --nproc-per-node N bench/bench_parallel.py [--lib build/libtilewise.so] [--iters 10] [--no-model]

Geometry: HunyuanVideo 720p, 30x48x80 latent tokens + 256 text (226 valid), 24 heads, D 128, bf16, tile 6x8x8,
window 3x3x3 (every head), and a calibrated-like per-head table with tilewise.parallel's load balance on and off.

Table 1, one attention layer, for every group size n = 1..N that divides the 24 heads (ranks 0..n-1 form the
group; the others wait): seconds per call (median over --iters, max over the group's ranks), the share of it
spent in the all-to-alls (the same collectives on the same shapes, timed alone), the speedup over n = 1 (the
plain single-GPU op) and the largest difference from the n = 1 output (the chunks joined by
tilewise.parallel.gather). Each n is run with `chunks` = 1 (one all-to-all in, one out) and 2 (two head groups
whose communication overlaps the other's attention), and with 2 and each `--sm-margins` value (SMs the attention
leaves to NCCL's kernels, which the persistent kernel would otherwise keep waiting); all are printed, the fastest
marked.

Table 2, one full HunyuanVideo 13B transformer forward (random bf16 weights, diffusers' context parallelism with
tilewise's processors, tilewise.diffusers.cp_plan): n = 1 (rank 0 alone) and n = N; the output of N compared with
n = 1's; on N also the uniform window with every all-to-all issued at the attention call (early_start off:
HunyuanVideo's single-stream blocks otherwise issue theirs before the block's MLP), and with `chunks` = 2, alone and
with the first `--sm-margins` value. Skipped with --no-model or when diffusers is missing.

--profile: time by kernel class (torch.profiler, rank 0) of one attention call (n = N, uniform window, chunks 1)
and of the forwards with the uniform window, each with its most expensive kernels: of the class "norms, RoPE,
activations, copies" and of all.

--smoke runs the same logic on the CPU with gloo, a tiny geometry and a tiny HunyuanVideo (to check the script,
e.g. `torchrun --nproc-per-node 2 bench/bench_parallel.py --smoke`), profiles included (CPU ops, self time);
its times mean nothing.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(__file__))
from report import emit, rel_l2  # noqa: E402

CALIBRATED_LIKE = [(3, 3, 3)] * 12 + [(1, 3, 5), (1, 3, 5), (2, 2, 3), (2, 2, 3)] + [(3, 6, 5)] * 4 + \
    [(5, 3, 10), (5, 3, 10), (5, 6, 10), (5, 6, 10)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, device, group=None) -> float:
    """Median seconds of `iters` calls after a warm-up, each ending when every rank of `group` is done."""
    fn()
    sync(device)
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        sync(device)
        if group is not None:  # the slowest rank's time: a barrier after the work, on the host
            dist.barrier(group=group)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def workers(n: int, device) -> str:
    """"n GPUs", or "n processes" on the CPU (--smoke)."""
    if device.type == "cuda":
        return f"{n} GPU" + ("" if n == 1 else "s")
    return f"{n} process" + ("" if n == 1 else "es")


def geometry(args):
    if args.smoke:  # 8 text tokens: diffusers' context parallelism shards the text too, in equal parts on 2 or 4
        return dict(latent=(3, 8, 10), tile=(1, 4, 5), text=8, valid=5, heads=4, head_dim=16)
    return dict(latent=(30, 48, 80), tile=(6, 8, 8), text=256, valid=226, heads=24, head_dim=128)


def configs(args, heads: int) -> list:
    """(label, windows, load_balance) of every configuration the tables run: the uniform window, then the
    calibrated-like per-head mix with tilewise.parallel's load balance on and off."""
    mix = [(1, 1, 1), (3, 2, 2), (2, 1, 1), (1, 2, 2)] if args.smoke else CALIBRATED_LIKE
    mix = [mix[h % len(mix)] for h in range(heads)]
    uniform = (1, 2, 2) if args.smoke else (3, 3, 3)
    rows = [("window " + "x".join(map(str, uniform)), uniform, None),
            ("per-head mix, balance on", mix, True),
            ("per-head mix, balance off", mix, False)]
    return rows[:1] if args.configs == "uniform" else rows


def nccl_settings() -> str:
    """The NCCL variables of this run besides the multicast switch every multi-GPU run sets (tables say what ran)."""
    items = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("NCCL_") and k != "NCCL_NVLS_ENABLE")
    return ", ".join(items) if items else "NCCL defaults"


def attention_table(args, device, dtype) -> str:
    import tilewise
    import tilewise.parallel as twp

    g = geometry(args)
    world, rank = dist.get_world_size(), dist.get_rank()
    T, H, W = g["latent"]
    S, heads, D = T * H * W + g["text"], g["heads"], g["head_dim"]
    gen = torch.Generator(device=device).manual_seed(0)  # the same full tensors on every rank
    q, k, v = (torch.randn(1, S, heads, D, generator=gen, device=device, dtype=dtype) for _ in range(3))
    groups = {1: dist.new_group(ranks=[0])}  # n = 1 through the collective path: its cost over the plain op
    for n in range(2, world + 1):  # every rank takes part in creating every group, in the same order
        if heads % n == 0:
            groups[n] = dist.new_group(ranks=list(range(n)))

    rows, profiles = [], []
    for label, windows, balance in configs(args, heads):
        kw = dict(latent=g["latent"], tile=g["tile"], window=windows, text_len=[g["valid"]])
        ref = tilewise.sliding_tile_attention(q, k, v, **kw)  # n = 1: the plain op
        base = timed(lambda: tilewise.sliding_tile_attention(q, k, v, **kw), args.iters, device)
        rows.append(f"| {label} | 1 | - | {base * 1e3:.2f} | - | 1.00x | 0 |")
        for n, group in groups.items():
            if rank >= n:
                continue
            lo, hi = twp.shard_range(S, rank, n)
            ql, kl, vl = (t[:, lo:hi].contiguous() for t in (q, k, v))
            results = {}
            # (chunks, sm_margin): one all-to-all each way; two head groups; two head groups with SMs left free
            # for the collectives, so the second group's all-to-all can run beside the first group's attention
            # (with --copy-engine, also exchange="copy_engine": chunks 1 and 2, one SM left for its barrier kernel)
            variants = [(1, 0, "nccl")] if n == 1 else \
                [(1, 0, "nccl"), (2, 0, "nccl")] + [(2, m, "nccl") for m in args.sm_margins if m > 0]
            # The copy-engine exchange on the whole world only (the group the model runs on and the tests exercise)
            if n > 1 and n == world and args.copy_engine and device.type == "cuda":
                variants += [(1, 1, "copy_engine"), (2, 1, "copy_engine")]
            for chunks, margin, exchange in variants:
                # a row far past its time prints every rank's Python stacks (where a hang waits), as the model rows do
                faulthandler.dump_traceback_later(args.row_timeout, exit=False)

                def call():
                    with torch.no_grad():  # the copy-engine exchange serves calls without autograd
                        return twp.ulysses_attention(ql, kl, vl, group=group, seq_len=S, chunks=chunks,
                                                     load_balance=balance, sm_margin=margin, exchange=exchange, **kw)
                t_all = timed(call, args.iters, device, group)
                results[chunks, margin, exchange] = (t_all, rel_l2(twp.gather(call(), group, seq_len=S), ref))
                faulthandler.cancel_dump_traceback_later()
                if rank == 0:  # each measurement as it lands: a run cut short keeps what it measured
                    print(f"  layer: {label}, {n} GPUs, chunks {chunks}, sm_margin {margin}, {exchange}: "
                          f"{t_all * 1e3:.2f} ms, rel L2 {results[chunks, margin, exchange][1]:.3g}", flush=True)
            if n == 1:  # no all-to-all runs; the row says what the distributed path costs over the plain op
                t_all, err = results[1, 0, "nccl"]
                rows.append(f"| {label} | 1 ({backend_name(group)}) | 1 | {t_all * 1e3:.2f} | "
                            f"{100 * (t_all / base - 1):+.1f}% over the plain op | {base / t_all:.2f}x | {err:.3g} |")
                continue
            t_comm = timed(lambda: _all_to_alls_alone(ql, S, n, group, heads, D), args.iters, device, group)
            if (args.profile or args.smoke) and n == world and balance is None:
                line = profile_forward(lambda: twp.ulysses_attention(ql, kl, vl, group=group, seq_len=S, **kw),
                                       device)
                profiles.append(f"- {workers(n, device)}, {label}, chunks 1 (rank 0): {line}")
            best = min(results, key=lambda c: results[c][0])
            for (chunks, margin, exchange), (t_all, err) in results.items():
                mark = " (fastest)" if (chunks, margin, exchange) == best else ""
                name = f"{chunks}" + (f", sm_margin {margin}" if margin else "") + \
                    (", copy engine" if exchange == "copy_engine" else "")
                rows.append(f"| {label} | {n} | {name}{mark} | {t_all * 1e3:.2f} | "
                            f"{100 * min(1.0, t_comm / t_all):.0f}% | {base / t_all:.2f}x | {err:.3g} |")
    head = (f"One attention layer: {T}x{H}x{W} + {g['text']} text ({g['valid']} valid), {heads} heads, D {D}, "
            f"{dtype}, tile {g['tile']}, {nccl_settings()}. all-to-all share: the same collectives on the same shapes timed alone, "
            "over the call. rel L2: of the gathered output against the one-GPU op's (spec bound 1e-2).\n\n"
            "| pattern | GPUs | chunks | ms / call | all-to-all share | speedup | rel L2 vs 1 GPU |\n"
            "|---|---|---|---|---|---|---|")
    text = head + "\n" + "\n".join(rows)
    if profiles:
        text += "\n\nTime of one attention call by kernel class (torch.profiler):\n\n" + "\n".join(profiles)
    return text


def backend_name(group) -> str:
    return str(dist.get_backend(group)).upper()


def _all_to_alls_alone(x, S, n, group, heads, D):
    """The collectives of one ulysses_attention call with chunks=1 (q, k, v stacked in, o out), alone."""
    import tilewise.parallel as twp
    sizes = twp.shard_sizes(S, n)
    s = x.shape[1]
    buf = x.new_empty(n * s, 3, 1, heads // n, D)
    got = buf.new_empty(S, 3, 1, heads // n, D)
    dist.all_to_all_single(got, buf, sizes, [s] * n, group=group)
    back = x.new_empty(n * s, 1, heads // n, D)
    dist.all_to_all_single(back, got[:, 0].contiguous(), [s] * n, sizes, group=group)


# Kernel-name classes of the profile, first match wins (names as the CUDA profiler demangles them; the c10d and
# aten names of --smoke's CPU ops fall in the same classes).
KERNEL_CLASSES = [("all-to-all (NCCL)", ("nccl", "c10d")), ("tilewise attention", ("tilewise",)),
                  ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm")),
                  ("norms, RoPE, activations, copies", ("",))]
OTHER_CLASS = KERNEL_CLASSES[-1][0]
TOP_KERNELS = 8


def profile_forward(fn, device) -> str:
    """Time of one call of fn by kernel class, then its TOP_KERNELS most expensive kernels of OTHER_CLASS and of
    all classes (torch.profiler, this rank), as a markdown fragment. GPU kernels on CUDA; on the CPU (--smoke)
    the ops' self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync(device)
    kernels = []  # (class, name, microseconds)
    for e in prof.key_averages():
        t = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) if cuda \
            else e.self_cpu_time_total
        if not t or e.key.startswith("ProfilerStep"):
            continue
        cls = next(cls for cls, keys in KERNEL_CLASSES if any(k in e.key.lower() for k in keys))
        kernels.append((cls, e.key, t))
    totals = {cls: sum(t for c, _, t in kernels if c == cls) for cls, _ in KERNEL_CLASSES}
    total = sum(totals.values()) or 1.0

    def top(rows) -> str:
        rows = sorted(rows, key=lambda row: -row[2])[:TOP_KERNELS]
        return "; ".join(f"`{short_name(name)}` {t / 1e3:.1f} ms" for _, name, t in rows)
    return (", ".join(f"{cls} {t / 1e3:.1f} ms ({100 * t / total:.0f}%)" for cls, t in totals.items()) +
            f"\n  - top {TOP_KERNELS} of {OTHER_CLASS}: " + top(row for row in kernels if row[0] == OTHER_CLASS) +
            f"\n  - top {TOP_KERNELS} of all: " + top(kernels))


def short_name(kernel: str, width: int = 60) -> str:
    """A kernel name cut to `width` characters, first without the namespaces that make demangled CUDA names run
    to hundreds (so that e.g. "vectorized_elementwise_kernel<4, CUDAFunctor_add<BFloat16>" keeps its functor)."""
    for noise in ("void ", "at::native::", "at::cuda::", "at::", "(anonymous namespace)::", "c10::", "std::", "`"):
        kernel = kernel.replace(noise, "")
    return kernel if len(kernel) <= width else kernel[:width - 3] + "..."


def tiny_hunyuan(args):
    """--smoke's transformer: a tiny HunyuanVideo (4 heads, D 16, float32 on the CPU) on the smoke geometry's latent
    grid, with text padding, in bench_e2e.hunyuan's form (name, model, inputs)."""
    from diffusers import HunyuanVideoTransformer3DModel
    g = geometry(args)
    T, H, W = g["latent"]
    D, d = g["head_dim"], g["head_dim"] // 4
    torch.manual_seed(0)  # the same weights on every rank
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=g["heads"], attention_head_dim=D, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(D - 2 * (3 * d // 2), 3 * d // 2, 3 * d // 2)).eval()
    mask = torch.zeros(1, g["text"], dtype=torch.bool)
    mask[:, :g["valid"]] = True
    inputs = dict(hidden_states=torch.randn(1, 4, T, H, W), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, g["text"], 16), encoder_attention_mask=mask,
                  pooled_projections=torch.randn(1, 8), guidance=torch.tensor([6.0]), return_dict=False)
    return f"tiny HunyuanVideo, {T}x{H}x{W} + {g['text']} text", model, inputs


def model_table(args, device) -> str:
    try:
        from diffusers import ContextParallelConfig
        from bench_e2e import hunyuan
    except ImportError as e:
        return f"(transformer forward skipped: {e})"
    import tilewise.diffusers as twd

    world, rank = dist.get_world_size(), dist.get_rank()
    if args.smoke:
        name, model, inputs = tiny_hunyuan(args)
        # diffusers 0.42's enable_parallelism takes rank % torch.accelerator.device_count(), 0 without a GPU: one
        # device, which then is the CPU (as in tests/python/test_parallel_diffusers.py)
        torch.accelerator.device_count = lambda: 1
    else:
        name, model, inputs, _, _, _ = hunyuan(args)
    tile, heads = geometry(args)["tile"], model.config.num_attention_heads
    rows, profiles = [], []
    with torch.no_grad():
        # n = 1 first for every configuration (rank 0 alone), then the model goes parallel once
        singles = {}
        for label, windows, balance in configs(args, heads):
            twd.enable(model, windows, tile=tile, load_balance=balance)
            ref = model(**inputs)[0]
            t1 = timed(lambda: model(**inputs), args.model_iters, device) if rank == 0 else float("nan")
            singles[label] = (ref, t1)
            rows.append(f"| {label} | 1 | {t1:.3f} | 1.00x | 0 |")
            if rank == 0 and (args.profile or args.smoke) and label.startswith("window"):
                profiles.append(f"- {workers(1, device)}, {label}: " + profile_forward(lambda: model(**inputs), device))
        if world > 1:
            twd.disable(model)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=twd.cp_plan(model))
            # every configuration with chunks 1, then the uniform window with 2 head groups (overlap), alone and
            # with the first --sm-margins value, measured against the same one-GPU forward
            runs = [(label, label, windows, balance, 1, 0, True, "nccl")
                    for label, windows, balance in configs(args, heads)]
            uniform_label, uniform, _ = configs(args, heads)[0]
            # the single-stream blocks' all-to-all at the attention call instead of before the MLP (early_start)
            runs.append((f"{uniform_label}, early start off", uniform_label, uniform, None, 1, 0, False, "nccl"))
            runs.append((f"{uniform_label}, chunks 2", uniform_label, uniform, None, 2, 0, True, "nccl"))
            margin = next((m for m in args.sm_margins if m > 0), 0)
            if margin:
                runs.append((f"{uniform_label}, chunks 2, sm_margin {margin}", uniform_label, uniform, None, 2, margin,
                             True, "nccl"))
            if args.copy_engine and device.type == "cuda":  # the exchanges off the SMs (one left for the barrier)
                runs.append((f"{uniform_label}, copy engine", uniform_label, uniform, None, 1, 1, True, "copy_engine"))
                runs.append((f"{uniform_label}, chunks 2, copy engine", uniform_label, uniform, None, 2, 1, True,
                             "copy_engine"))
            if args.model_rows:
                runs = [r for r in runs if args.model_rows in r[0]]
            for label, single, windows, balance, chunks, sm_margin, early, exchange in runs:
                # A row that takes far longer than a forward should prints every thread's Python stack (each rank
                # on its stderr) and goes on: a hang then shows where it waits (the copy-engine rows' first run
                # printed nothing in 420 s, docs/parallel.md).
                faulthandler.dump_traceback_later(args.row_timeout, exit=False)
                twd.enable(model, windows, tile=tile, load_balance=balance, chunks=chunks, sm_margin=sm_margin,
                           early_start=early, exchange=exchange)
                tn = timed(lambda: model(**inputs), args.model_iters, device, dist.group.WORLD)
                ref, t1 = singles[single]
                err = rel_l2(model(**inputs)[0], ref)
                rows.append(f"| {label} | {world} | {tn:.3f} | {t1 / tn:.2f}x | {err:.3g} |")
                if rank == 0:  # each row as it lands: a run cut short keeps what it measured
                    print("  model row:", rows[-1], flush=True)
                if (args.profile or args.smoke) and label.startswith("window"):
                    line = profile_forward(lambda: model(**inputs), device)
                    if rank == 0:
                        profiles.append(f"- {workers(world, device)}, {label} (rank 0): " + line)
                faulthandler.cancel_dump_traceback_later()
    text = (f"One transformer forward: {name}, random weights, {nccl_settings()}, diffusers' context parallelism "
            "(`enable_parallelism(ContextParallelConfig(ulysses_degree=N))`) with tilewise's processors. rel L2: "
            "of the output against the one-GPU output.\n\n"
            "| pattern | GPUs | s / forward | speedup | rel L2 vs 1 GPU |\n|---|---|---|---|---|\n" + "\n".join(rows))
    if profiles:
        text += "\n\nTime of one forward by kernel class (torch.profiler):\n\n" + "\n".join(profiles)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=None, help="libtilewise.so (default: TILEWISE_LIBRARY or build/)")
    ap.add_argument("--iters", type=int, default=10, help="timed calls of the attention layer")
    ap.add_argument("--model-iters", type=int, default=3, help="timed transformer forwards (about 5 s each)")
    ap.add_argument("--profile", action="store_true",
                    help="time by kernel class and the top kernels of one attention call and one forward")
    ap.add_argument("--sm-margins", type=lambda x: [int(m) for m in x.split(",") if m], default=[16, 32],
                    help="SMs left to the collectives, each timed with chunks 2 (comma-separated; 0: none)")
    ap.add_argument("--no-model", action="store_true", help="skip the transformer forward")
    ap.add_argument("--no-layer", action="store_true", help="skip the attention-layer table")
    ap.add_argument("--row-timeout", type=float, default=150.0,
                    help="seconds after which a model row prints every rank's Python stacks (a hang's whereabouts)")
    ap.add_argument("--model-rows", default=None,
                    help="time only the parallel model rows whose label contains this (the one-GPU rows still run)")
    ap.add_argument("--copy-engine", action="store_true",
                    help="also time exchange='copy_engine' (the all-to-alls on the copy engines; CUDA, inference)")
    ap.add_argument("--configs", choices=["all", "uniform"], default="all",
                    help="uniform: the uniform window alone (a quicker run, e.g. to compare NCCL settings)")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes: checks the script only")
    ap.add_argument("--out", default=None, help="also write the tables to this file (rank 0)")
    args = ap.parse_args()
    if args.lib:
        os.environ["TILEWISE_LIBRARY"] = args.lib
    if "RANK" not in os.environ:  # plain `python bench_parallel.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", LOCAL_RANK="0")
    backend = "gloo" if args.smoke else "nccl"
    dist.init_process_group(backend)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.bfloat16
        torch.cuda.set_device(device)
    tables = [] if args.no_layer else [attention_table(args, device, dtype)]
    if dist.get_rank() == 0 and tables:  # printed now: the transformer forwards take minutes
        print(tables[0], flush=True)
    if not args.no_model:
        tables.append(model_table(args, device))
        if dist.get_rank() == 0:
            emit(tables[-1], None)
    if dist.get_rank() == 0:
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n\n".join(tables) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
