"""Time, SM clock and board power of one benchmark row's kernels, each run back to back for a few seconds while
nvidia-smi samples the card: whether a kernel is bound by the power limit (clock pulled below its maximum at the
limit) or by something on the chip (clock at its maximum, power below the limit). Under a power limit a kernel's
time follows its energy, so the times of its parts add up even where the hardware could overlap them.

Usage (on the GPU machine, repo root):
  python3 bench/power_probe.py [--row "Hunyuan 30x48x80 w3x3x3"] [--seconds 5] \
      [--fp8-variants no_sm=/tmp/f8/no_sm/libtilewise.so,...] [--bwd-variants no_red=/tmp/bv/no_red/libtilewise.so,...]
Prints one table: case, ms per call (CUDA events), median SM clock (MHz), median and p90 power (W), and the share of
samples in which the driver reports the software power cap as a reason for the clock (clocks_event_reasons).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from bench_backward import TilewiseRun  # noqa: E402
from bench_forward import (_capi, named_libraries, plan_kwargs, quantized_inputs, row_inputs, rows,  # noqa: E402
                           run_fp8_scaled)


def fields() -> str:
    """The query fields; the power-cap reason is clocks_event_reasons on recent drivers, clocks_throttle_reasons
    before."""
    help_text = subprocess.run(["nvidia-smi", "--help-query-gpu"], capture_output=True, text=True).stdout
    reason = "clocks_event_reasons" if "clocks_event_reasons.sw_power_cap" in help_text else "clocks_throttle_reasons"
    return f"clocks.sm,clocks.max.sm,power.draw,power.limit,{reason}.sw_power_cap"


class Sampler:
    """nvidia-smi's readings every 50 ms in a thread, kept between start() and stop()."""

    def __init__(self):
        self.proc = subprocess.Popen(["nvidia-smi", "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
                                      f"--query-gpu={fields()}", "--format=csv,noheader,nounits", "-lms", "50"],
                                     stdout=subprocess.PIPE, text=True)
        self.rows: list = []
        self.on = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if self.on:
                self.rows.append([x.strip() for x in line.split(",")])

    def start(self):
        self.rows, self.on = [], True

    def stop(self) -> list:
        self.on = False
        return self.rows

    def close(self):
        self.proc.terminate()


def measure(sampler: Sampler, fn, seconds: float) -> dict:
    """fn back to back for `seconds` (after 1 s of warm-up), timed by events, sampled by nvidia-smi. Each call is
    waited for before the clock is read: without it the loops would queue up to the driver's launch limit (about a
    thousand calls, minutes of a dense kernel) before the time check saw anything. The gaps this leaves are tens of
    microseconds against calls of milliseconds."""
    def loop(until: float) -> int:
        calls = 0
        while time.time() < until:
            fn()
            torch.cuda.synchronize()
            calls += 1
        return calls

    loop(time.time() + 1.0)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sampler.start()
    start.record()
    calls = loop(time.time() + seconds)
    stop.record()
    torch.cuda.synchronize()
    samples = sampler.stop()
    num = [[float(x) if x.replace(".", "", 1).isdigit() else float("nan") for x in s[:4]] for s in samples]
    clocks = [s[0] for s in num]
    power = sorted(s[2] for s in num)
    capped = [s[4].lower() in ("active", "1") for s in samples if len(s) > 4]
    return {"ms": start.elapsed_time(stop) / calls, "clock": statistics.median(clocks), "max_clock": num[0][1],
            "power": statistics.median(power), "p90": power[int(0.9 * (len(power) - 1))], "limit": num[0][3],
            "capped": sum(capped) / max(len(capped), 1), "samples": len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="Hunyuan 30x48x80 w3x3x3")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--lib", default=None, help="path to libtilewise.so")
    ap.add_argument("--fp8-variants", type=named_libraries, default=[],
                    help="NAME=LIB,...: FP8 kernel variants probed like the default")
    ap.add_argument("--bwd-variants", type=named_libraries, default=[],
                    help="NAME=LIB,...: backward variants (ablations) probed like the default: if an ablation's clock "
                         "rises as its time falls, energy bounds the default")
    ap.add_argument("--cases", default="", help="regular expression: probe only the cases whose names match it")
    args = ap.parse_args()
    _capi.lib(args.lib)
    default_lib = args.lib or _capi._find_library()
    row = next(r for r in rows() if r.name == args.row)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    S = row.latent[0] * row.latent[1] * row.latent[2] + row.text
    q, k, v, dout = row_inputs(row, 1, S, 4, dev)
    text_len = torch.full((1,), row.text_len, device=dev, dtype=torch.int32)
    tl_ptr = text_len.data_ptr() if row.text else 0
    run_kw = plan_kwargs(row)
    tw = TilewiseRun(row, q, k, v, dout, text_len, deterministic=False)
    o = torch.empty_like(q)
    fp8 = _capi.Plan(precision="fp8", **run_kw)
    inputs = quantized_inputs(fp8, q, k, v, tl_ptr)
    cases = [("tilewise bf16 forward", tw.forward), ("tilewise backward", tw.backward)]
    for name, path in args.bwd_variants:
        _capi.lib(path)  # each Plan keeps the library it was made with
        variant = TilewiseRun(row, q, k, v, dout, text_len, deterministic=False)
        variant.forward()  # o and lse for its backward (the ablations change the backward kernels only)
        cases.append((f"tilewise backward ({name})", variant.backward))
    for name, path in [("default", default_lib)] + args.fp8_variants:
        _capi.lib(path)
        plan = _capi.Plan(precision="fp8_scaled", **run_kw)
        cases.append((f"FP8 kernel ({name})", lambda plan=plan: run_fp8_scaled(plan, inputs, o, tl_ptr)))
    _capi.lib(default_lib)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qt, kt, vt)

    qg, kg, vg = (x.detach().requires_grad_() for x in (qt, kt, vt))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        og = F.scaled_dot_product_attention(qg, kg, vg)
    dog = dout.transpose(1, 2)

    def cudnn_backward():
        torch.autograd.grad(og, (qg, kg, vg), dog, retain_graph=True)

    cases += [("cuDNN dense forward", cudnn), ("cuDNN dense backward", cudnn_backward)]
    sampler = Sampler()
    time.sleep(0.5)
    idle = measure(sampler, lambda: torch.cuda._sleep(1000), 1.0)
    print(f"device: {torch.cuda.get_device_name()}; row: {row.name}; idle clock {idle['clock']:.0f} MHz, "
          f"{idle['power']:.0f} W; limit {idle['limit']:.0f} W, max SM clock {idle['max_clock']:.0f} MHz", flush=True)
    print("| case | ms | SM MHz (median) | W (median) | W (p90) | samples power-capped |\n|---|---|---|---|---|---|")
    for name, fn in cases:
        if args.cases and not re.search(args.cases, name):
            continue
        r = measure(sampler, fn, args.seconds)
        print(f"| {name} | {r['ms']:.2f} | {r['clock']:.0f} | {r['power']:.0f} | {r['p90']:.0f} | "
              f"{100 * r['capped']:.0f}% of {r['samples']} |", flush=True)
    sampler.close()


if __name__ == "__main__":
    main()
