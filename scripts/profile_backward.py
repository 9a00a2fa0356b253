#!/usr/bin/env python3
"""One backward of a benchmark problem inside an NVTX start/end range "bwd", for ncu: tilewise's (a warm-up forward and
backward first) or, with --cudnn, PyTorch SDPA's cuDNN backward on the same shape, dense. Every kernel of the range
is profiled, so the two backwards' kernels (their names, launch shapes, registers, shared memory, and the shared
memory and tensor-pipe counters) can be set side by side without knowing cuDNN's kernel names:

    ncu --nvtx --nvtx-include "bwd" --section LaunchStats ... python3 scripts/profile_backward.py LIB [--cudnn]

A start/end range (no trailing "/" in the filter), not push/pop: autograd runs cuDNN's backward kernels from its own
device thread, which a push/pop range of the main thread does not cover.

With --passes N (no ncu): N backwards under torch.profiler, then one table of the device time of each kernel and
memset per backward (mean over the N), e.g. the preprocess, the main kernel and the dQ conversion side by side:

    python3 scripts/profile_backward.py LIB --heads 24 --passes 20

--text 256 --text-len 226 adds the benchmark's + text rows (text last) to tilewise's problem.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from profile_forward import _capi, dims, print_passes, problem_args  # noqa: E402

ap = problem_args(argparse.ArgumentParser())
ap.add_argument("--cudnn", action="store_true", help="PyTorch SDPA's cuDNN backward (dense) on the same shape")
ap.add_argument("--passes", type=int, default=0, help="N backwards under torch.profiler: device ms per kernel")
ap.add_argument("--layout", choices=("bshd", "bhsd"), default="bshd", help="the tensors' layout (tilewise's backward)")
ap.add_argument("--text", type=int, default=0, help="text tokens after the video (tilewise's backward; the bench's + text: 256)")
ap.add_argument("--text-len", type=int, default=None, help="valid text tokens (default: all; the bench's + text: 226)")
a = ap.parse_args()
if a.cudnn and a.text:
    ap.error(f"--text {a.text} with --cudnn: expected 0 (the cuDNN comparison is dense video only)")
text_len = a.text if a.text_len is None else a.text_len
if not 0 <= text_len <= a.text:
    ap.error(f"--text-len {text_len}: expected 0 to --text ({a.text})")
if a.cudnn and a.layout != "bshd":
    ap.error(f"--layout {a.layout} with --cudnn: expected bshd (the cuDNN comparison transposes bshd tensors)")
_capi.lib(a.lib)
latent = dims(a.latent)
S = latent[0] * latent[1] * latent[2] + a.text
shape = (1, a.heads, S, a.head_dim) if a.layout == "bhsd" else (1, S, a.heads, a.head_dim)
q, k, v, do = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
if a.cudnn:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qg, kg, vg = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(qg, kg, vg)

    def backward():
        torch.autograd.grad(o, (qg, kg, vg), do.transpose(1, 2), retain_graph=True)
else:
    plan = _capi.Plan(batch=1, q_heads=a.heads, kv_heads=a.heads, head_dim=a.head_dim, dtype="bf16", latent=latent,
                      tile=dims(a.tile), text_capacity=a.text, text_position="last", pattern="sliding_tile",
                      windows=[dims(a.window)], layout=a.layout, device="cuda")
    o = torch.empty_like(q)
    lse = torch.empty(1, a.heads, S, device="cuda", dtype=torch.float32)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    workspace = torch.empty(max(plan.backward_workspace_bytes(), 1), device="cuda", dtype=torch.uint8)
    text_lens = torch.full((1,), text_len, device="cuda", dtype=torch.int32)
    tl_ptr = text_lens.data_ptr() if a.text else 0
    plan.run(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), tl_ptr)

    def backward():
        plan.run_backward(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), o=o.data_ptr(), lse=lse.data_ptr(),
                          dout=do.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(), text_len=tl_ptr,
                          workspace=workspace.data_ptr(), deterministic=False,
                          stream=torch.cuda.current_stream().cuda_stream)
backward()  # warm-up, outside the range
torch.cuda.synchronize()
if a.passes:
    print_passes(backward, a.passes, f"{S} tokens, {a.heads} heads")
    sys.exit(0)
rng = torch.cuda.nvtx.range_start("bwd")
backward()
torch.cuda.synchronize()
torch.cuda.nvtx.range_end(rng)
print("ok", "cudnn" if a.cudnn else "tilewise", S, a.heads)
