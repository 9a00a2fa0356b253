"""tilewise.diffusers under diffusers' own context parallelism (issue 15): with tilewise enabled,
`transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2), cp_plan=tilewise.diffusers.cp_plan(
transformer))` on tiny HunyuanVideo, Wan and CogVideoX transformers, in 2 gloo processes on the CPU, gives the
single-process output; tilewise's processors run every layer (none falls back to the model's attention), and
HunyuanVideo's single-stream blocks start their attention's all-to-all before the block's MLP.

diffusers 0.42's enable_parallelism picks the device as `rank % torch.accelerator.device_count()`, which divides by
zero on a machine without an accelerator; the workers report one device so that it runs on the CPU (the device
it then names is the CPU, and the mesh is a gloo one). Everything else is diffusers' code as shipped: its
device mesh, its split / gather hooks, the parallel config on the processors."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")
pytest.importorskip("diffusers", reason="diffusers is not installed (see requirements-torch.txt)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_parallel import exit_worker, launch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

FAMILIES = ["hunyuan", "wan", "cogvideox"]


def _grads(model, inputs, weight, sum_over_ranks: bool) -> list:
    """Gradients of sum(output * weight) with respect to the input latents and every parameter. Under context
    parallelism each rank's backward covers its own tokens (diffusers' gather hands each rank its chunk of the
    output's gradient): summed over the ranks they are the single-process gradients."""
    import torch.distributed as dist
    model.zero_grad(set_to_none=True)
    x = inputs["hidden_states"].clone().requires_grad_()
    (model(**dict(inputs, hidden_states=x)).sample * weight).sum().backward()
    grads = [x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    if sum_over_ranks:
        for g in grads:
            dist.all_reduce(g)
    return grads


def _largest_difference(a: list, b: list) -> tuple:
    """(max |a - b| over all tensors, max |b|)."""
    return (max(float((x - y).abs().max()) for x, y in zip(a, b)), max(float(y.abs().max()) for y in b))


def _worker(rank: int, world: int, port: int, seed: int, out: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import tilewise.diffusers as twd
    from tiny_models import TILE, build, run

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.accelerator.device_count = lambda: 1  # see the module docstring: diffusers divides by this
    results = {}
    for family in FAMILIES:
        torch.manual_seed(seed)
        model, inputs = build(family)
        if family == "cogvideox":  # 8 text tokens: diffusers' equal split needs a multiple of the degree
            inputs["encoder_hidden_states"] = torch.randn(2, 8, 16)
        ctrl = twd.enable(model, {"window": [(1, 1, 1), (2, 2, 1)], "tile": TILE})
        ref = run(model, inputs)
        weight = torch.randn(ref.shape)  # the same on every rank (same seed)
        ref_grads = _grads(model, inputs, weight, sum_over_ranks=False)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=twd.cp_plan(model))
        ctrl.calls, ctrl.started_early, ctrl.rotary_in_place = {"tilewise": 0, "original": 0}, 0, 0
        got = run(model, inputs)
        calls, early, in_place = dict(ctrl.calls), ctrl.started_early, ctrl.rotary_in_place
        grad_err, grad_scale = _largest_difference(_grads(model, inputs, weight, sum_over_ranks=True), ref_grads)
        # gradient checkpointing (the training recipes' setting): the backward reruns each block's forward, its
        # hooks and collectives included
        model.enable_gradient_checkpointing()
        ckpt_err, _ = _largest_difference(_grads(model, inputs, weight, sum_over_ranks=True), ref_grads)
        model.disable_gradient_checkpointing()
        # enabled again after enable_parallelism, with tilewise.parallel's options: load balance off, 2 head groups,
        # 8 SMs left to the collectives, every all-to-all issued at the attention call
        twd.enable(model, {"window": [(1, 1, 1), (2, 2, 1)], "tile": TILE}, load_balance=False, chunks=2,
                   sm_margin=8, early_start=False)
        ctrl = twd.controller(model)
        again = run(model, inputs)
        late = ctrl.started_early
        results[family] = {"err": float((got - ref).abs().max()), "scale": float(ref.abs().max()),
                           "err_options": float((again - ref).abs().max()),
                           "grad_err": grad_err, "grad_scale": grad_scale, "ckpt_err": ckpt_err, "calls": calls,
                           "early": early, "rotary_in_place": in_place,
                           "early_when_off": late,
                           "layers": len(ctrl.modules),
                           "single_layers": len(getattr(model, "single_transformer_blocks", ()))}
    dist.barrier()
    dist.destroy_process_group()
    Path(out).write_text(json.dumps({"results": results}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    seed = int(np.random.SeedSequence().entropy % (1 << 62))
    print("seed", seed)
    return launch(2, tmp_path_factory.mktemp("cp"), seed, worker=__file__)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_parallel_equals_single_process(report, family):
    for rank, rep in enumerate(report):
        got = rep["results"][family]
        assert got["calls"] == {"tilewise": got["layers"], "original": 0}, (family, rank, got)
        # HunyuanVideo's single-stream blocks start their attention's all-to-all before the block's MLP (and the
        # result is still the single process's); no other family or block does
        assert got["early"] == got["single_layers"] and (family != "hunyuan" or got["early"] > 0), (family, rank, got)
        assert got["early_when_off"] == 0, (family, rank, got)  # early_start=False
        # without autograd HunyuanVideo's RoPE writes q and k into the send buffer (every layer), and the output is
        # still the single process's
        assert got["rotary_in_place"] == (got["layers"] if family == "hunyuan" else 0), (family, rank, got)
        # float32 model: the CP run sums in another order (all-to-all, split linear layers are the same math)
        assert got["err"] <= 1e-5 * max(1.0, got["scale"]), (family, rank, got)
        assert got["err_options"] <= 1e-5 * max(1.0, got["scale"]), (family, rank, got)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_parallel_gradients_equal_single_process(report, family):
    """The backward through tilewise's all-to-alls under diffusers' context parallelism (video and text split
    separately, received in the spec's order): the input and parameter gradients, summed over the ranks, are the
    single-process ones, also with gradient checkpointing (blocks, hooks and collectives rerun in the backward)."""
    for rank, rep in enumerate(report):
        got = rep["results"][family]
        assert got["grad_err"] <= 1e-5 * max(1.0, got["grad_scale"]), (family, rank, got)
        assert got["ckpt_err"] <= 1e-5 * max(1.0, got["grad_scale"]), (family, rank, got)  # with checkpointing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_into_the_send_buffer_is_diffusers_rope_bitwise(dtype):
    """The HunyuanVideo processor's RoPE that writes into the all-to-all's send buffer (a tilewise.parallel
    Producer) gives diffusers' apply_rotary_emb bit for bit, whole and by head blocks (P = 2, heads [1, 3) of each)."""
    from diffusers.models.embeddings import apply_rotary_emb

    from tilewise.diffusers.hunyuan_video import _RotaryInto
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % (1 << 62)))
    B, n, H, D = 2, 11, 8, 16
    x = torch.randn(B, n + 3, H, D, generator=gen).to(dtype)[:, :n]  # a view of a longer sequence, as in _front
    emb = (torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen))
    ref = apply_rotary_emb(x, emb, sequence_dim=1)
    producer = _RotaryInto(x, emb)
    assert torch.equal(producer.materialize(), ref)
    send = torch.full((n, B, 2, 2, D), float("nan"), dtype=dtype)  # [rows, B, P, h, D], strided as the send slot
    producer.write(send.permute(1, 0, 2, 3, 4), 2, 1, 3)
    assert torch.equal(send.permute(1, 0, 2, 3, 4), ref.unflatten(2, (2, -1))[:, :, :, 1:3])


def test_cp_plan_is_diffusers_own_for_wan_and_tilewise_s_for_the_others():
    """Wan's own plan (less the per-token timestep split that diffusers 0.42.1 crashes on for [B] timesteps)."""
    import tilewise.diffusers as twd
    from tiny_models import build
    wan, _ = build("wan")
    assert twd.cp_plan(wan, per_token_timesteps=True) == type(wan)._cp_plan
    assert twd.cp_plan(wan) == {k: v for k, v in type(wan)._cp_plan.items() if k != ""}
    for family in ("hunyuan", "cogvideox"):
        model, _ = build(family)
        assert getattr(model, "_cp_plan", None) is None  # diffusers 0.42 has none: tilewise provides it
        assert "proj_out" in twd.cp_plan(model)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    exit_worker()
