"""Autograd through torch.ops.tilewise.attention_fwd / attention_bwd (issue 13's Python part), against the
float64 spec oracle of spec_oracle.py differentiated by torch (never the library itself): gradcheck in float64
on the CPU backend, gradients against the dense reference with the same mask, opcheck of both ops, a training
step under torch.compile(fullgraph=True), and a tiny diffusers transformer that trains with tilewise enabled.

These need the library's CPU backward; with a library that has none yet, they skip and say so."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")

import tilewise  # noqa: E402
from tilewise import _capi  # noqa: E402
from spec_oracle import torch_oracle, torch_sta_video_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] == 9
hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA Hopper GPU (sm_90) for the tilewise kernel")


def _cpu_backward_missing():
    """The library's refusal when its CPU backend has no backward pass yet (None when it has one)."""
    q = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    try:
        tilewise.dense_attention(q.requires_grad_(), q.detach(), q.detach(), latent=(1, 1, 2), tile=(1, 1, 1)) \
            .sum().backward()
    except _capi.TilewiseError as e:
        if e.argument == "backward":
            return str(e)
        raise
    return None


_MISSING = _cpu_backward_missing()
needs_backward = pytest.mark.skipif(_MISSING is not None, reason=f"the library has no CPU backward: {_MISSING}")


@pytest.fixture
def gen():
    seed = int(np.random.SeedSequence().entropy % (1 << 62))
    print("seed", seed)
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=torch.float64, device="cpu", grad=True):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) \
        .requires_grad_(grad)


def qkv(gen, B, S, Hq, Hk, D, **kw):
    return [randn(gen, B, S, h, D, **kw) for h in (Hq, Hk, Hk)]


CASES = {  # name -> (latent, tile, Hq, Hk, D, text capacity, text_len, call)
    "sliding_tile_text": ((2, 3, 4), (1, 2, 3), 2, 2, 8, 3, [3, 1],
                          lambda q, k, v, tl, **kw: tilewise.sliding_tile_attention(
                              q, k, v, latent=(2, 3, 4), tile=(1, 2, 3), window=[(1, 1, 1), (2, 1, 2)], text_len=tl,
                              **kw)),
    "attention_tile_gqa": ((3, 2, 2), (1, 2, 2), 4, 2, 8, 2, [2, 0],
                           lambda q, k, v, tl, **kw: tilewise.attention_tile(
                               q, k, v, latent=(3, 2, 2), tile=(1, 2, 2), global_frames=[1, 0, 1, 0], radius=[0, 1, 1, 0],
                               text_len=tl, **kw)),
    "sliding_tile_text_first_gqa": ((2, 4, 2), (1, 2, 2), 4, 1, 4, 2, [1, 2],
                                    lambda q, k, v, tl, **kw: tilewise.sliding_tile_attention(
                                        q, k, v, latent=(2, 4, 2), tile=(1, 2, 2), window=(1, 1, 1), text_len=tl,
                                        text_position="first", **kw)),
}


def _masks(name):
    latent, tile = CASES[name][:2]
    nv = latent[0] * latent[1] * latent[2]
    if name == "attention_tile_gqa":
        f = torch.arange(nv) // (latent[1] * latent[2])
        out = []
        for g, r in zip([1, 0, 1, 0], [0, 1, 1, 0]):
            out.append((f[:, None] < g) | (f[None, :] < g) | ((f[:, None] - f[None, :]).abs() <= r))
        return out
    windows = [(1, 1, 1), (2, 1, 2)] if name == "sliding_tile_text" else [(1, 1, 1)]
    return [torch_sta_video_mask(latent, tile, w) for w in windows]


@needs_backward
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_lse", [False, True])
def test_gradcheck_float64(gen, name, with_lse):
    latent, tile, Hq, Hk, D, L, text_len, call = CASES[name]
    S = latent[0] * latent[1] * latent[2] + L
    inputs = qkv(gen, 2, S, Hq, Hk, D)
    tl = torch.tensor(text_len, dtype=torch.int32)

    def f(q, k, v):
        o, lse = call(q, k, v, tl, return_lse=True)
        return (o, lse) if with_lse else o   # with_lse: dLSE flows into the backward too

    if with_lse:  # the LSE is float32 whatever the inputs (the C ABI's lse): a coarser finite difference
        assert torch.autograd.gradcheck(f, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)
    else:
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_backward
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_the_dense_reference(gen, name):
    latent, tile, Hq, Hk, D, L, text_len, call = CASES[name]
    S = latent[0] * latent[1] * latent[2] + L
    q, k, v = qkv(gen, 2, S, Hq, Hk, D, dtype=torch.float32)
    dout, dlse = randn(gen, 2, S, Hq, D, grad=False), randn(gen, 2, Hq, S, grad=False)
    o, lse = call(q, k, v, torch.tensor(text_len), return_lse=True)
    ((o * dout).sum() + (lse * dlse).sum()).backward()
    got = [x.grad.clone() for x in (q, k, v)]
    assert [g.shape for g in got] == [q.shape, k.shape, v.shape]  # GQA: kv-shaped dk, dv
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = torch_oracle(*ref, latent, _masks(name), text_len, name.endswith("first_gqa"))
    ((o_ref * dout).sum() + (lse_ref * dlse).sum()).backward()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.grad, rtol=1e-4, atol=1e-5)


@needs_backward
def test_noncontiguous_grads_views_and_bhsd(gen):
    latent, tile = (2, 2, 4), (1, 2, 2)
    S, B, H, D = 16 + 2, 2, 2, 8
    fused = randn(gen, B, H, S, 3, D)     # [B, H, S, 3, D]: q, k, v are strided bhsd views with gaps
    q, k, v = fused.unbind(3)
    kw = dict(latent=latent, tile=tile, window=(1, 1, 2), layout="bhsd", text_len=[2, 1])
    o = tilewise.sliding_tile_attention(q, k, v, **kw)
    dout = randn(gen, B, S, H, D, grad=False).transpose(1, 2)   # a non-contiguous upstream gradient
    (o * dout).sum().backward()
    ref = fused.detach().clone().requires_grad_()
    o_ref, _ = torch_oracle(*(x.transpose(1, 2) for x in ref.unbind(3)), latent,
                            [torch_sta_video_mask(latent, tile, (1, 1, 2))], [2, 1])
    (o_ref.transpose(1, 2) * dout).sum().backward()
    torch.testing.assert_close(fused.grad, ref.grad, rtol=1e-6, atol=1e-8)


@needs_backward
def test_deterministic_backward_is_bitwise_reproducible(gen):
    latent, tile, Hq, Hk, D, L, text_len, call = CASES["sliding_tile_text"]
    q, k, v = qkv(gen, 2, 24 + L, Hq, Hk, D, dtype=torch.float32)
    grads = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        call(q, k, v, text_len, deterministic=True).square().sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def _fwd_args(q, k, v, tl):
    return (q, k, v, tl, [], [2, 3, 4], [1, 2, 3], "sliding_tile", [1, 1, 1, 2, 1, 2], [], [], [], [], "last",
            "raster", "bshd", 0.0, 0, False)


@needs_backward
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=hopper)])
def test_opcheck_forward_with_autograd_and_backward(gen, device):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    D = 8 if device == "cpu" else 64
    q, k, v = qkv(gen, 2, 27, 2, 2, D, dtype=dtype, device=device)
    tl = torch.tensor([3, 1], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.tilewise.attention_fwd.default, _fwd_args(q, k, v, tl))
    with torch.no_grad():
        o, lse = torch.ops.tilewise.attention_fwd(*_fwd_args(q, k, v, tl))
    dout = randn(gen, *o.shape, dtype=dtype, device=device, grad=False)
    dlse = randn(gen, *lse.shape, dtype=torch.float32, device=device, grad=False)
    for d in (dlse, None):
        args = (dout, d, q.detach(), k.detach(), v.detach(), o, lse) + _fwd_args(q, k, v, tl)[3:]
        torch.library.opcheck(torch.ops.tilewise.attention_bwd.default, args)


class _Attention(torch.nn.Module):
    """q, k, v projections around tilewise: the smallest model a training step can update."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, text_len):
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)) for p in (self.to_q, self.to_k, self.to_v))
        o = tilewise.sliding_tile_attention(q, k, v, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1),
                                            text_len=text_len)
        return self.out(o.flatten(2))


@needs_backward
def test_training_step_under_torch_compile_fullgraph(gen):
    # The loss is compiled whole (fullgraph=True: any graph break is an error); AOTAutograd derives the backward
    # graph from the ops' autograd registration, so loss.backward() runs a compiled graph holding attention_bwd.
    # aot_eager-style compilers (recording the graphs): inductor's C++ compile adds minutes on a 2-core CPU
    # machine and nothing this test checks.
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def compile_graph(gm, example_inputs):
            graphs[kind].append(gm)
            return gm.forward
        return compile_graph

    model = _Attention()
    x, tl = randn(gen, 2, 32 + 4, 16, dtype=torch.float32, grad=False), torch.tensor([4, 2])
    target = randn(gen, 2, 36, 16, dtype=torch.float32, grad=False)

    def loss_fn(m):
        return torch.nn.functional.mse_loss(m(x, tl), target)

    loss_fn(model).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True,
                             backend=aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")))
    compiled(model).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # the step itself: eager, like most training loops
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1
    assert "tilewise.attention_fwd" in str(graphs["forward"][0].graph)
    assert "tilewise.attention_bwd" in str(graphs["backward"][0].graph)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6)
        assert p.grad.abs().max() > 0, n


@needs_backward
def test_tiny_diffusers_transformer_trains_one_step(gen):
    pytest.importorskip("diffusers", reason="diffusers is not installed (see requirements-torch.txt)")
    import tilewise.diffusers as twd
    from tiny_models import TILE, build

    torch.manual_seed(int(torch.randint(0, 1 << 30, (1,), generator=gen)))
    model, inputs = build("wan")
    model.train()
    ctrl = twd.enable(model, strategy=(1, 1, 1), tile=TILE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = model.blocks[0].attn1.to_q.weight.detach().clone()
    out = model(**inputs).sample
    torch.nn.functional.mse_loss(out, torch.randn_like(out)).backward()
    assert ctrl.calls["tilewise"] == 2
    for block in model.blocks:
        for proj in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v):
            assert proj.weight.grad is not None and proj.weight.grad.abs().max() > 0
    opt.step()
    assert not torch.equal(model.blocks[0].attn1.to_q.weight, before)
    twd.disable(model)


@hopper
def test_cuda_backward_bf16_against_the_reference(gen):
    latent, tile = (2, 8, 8), (1, 8, 8)
    q, k, v = qkv(gen, 1, 128 + 8, 2, 1, 64, dtype=torch.bfloat16, device="cuda")
    o = tilewise.sliding_tile_attention(q, k, v, latent=latent, tile=tile, window=(1, 1, 1), text_len=[5])
    dout = randn(gen, *o.shape, dtype=torch.bfloat16, device="cuda", grad=False)
    (o * dout).sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, _ = torch_oracle(*ref, latent, [torch_sta_video_mask(latent, tile, (1, 1, 1))], [5])
    (o_ref * dout.double()).sum().backward()
    for g, r in zip((q.grad, k.grad, v.grad), ref):
        assert float((g.double() - r.grad).norm() / r.grad.norm()) <= 1e-2
