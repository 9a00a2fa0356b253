"""Pieces both recipes use: data on the device, the dense teacher, the tilewise student (LoRA, gradient
checkpointing, DDP or FSDP, sequence parallelism), attention-output hooks, the dense pretraining stage and the proxy evaluation."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import tilewise.diffusers as twd
from tilewise.train import data as data_mod
from tilewise.train import flow, models
from tilewise.train.loop import Run, load_tensors, unwrap


def dataset(preset, data_dir: Optional[str]):
    if data_dir is not None:
        ds = data_mod.LatentFolder(data_dir)
        if ds.shapes["latents"][0] != preset.latent[0]:
            raise ValueError(f"invalid data = {data_dir!r}: latents have {ds.shapes['latents'][0]} channels, the "
                             f"model takes {preset.latent[0]}")
        return ds
    return data_mod.MovingShapes(preset.samples, preset.latent, preset.text_len, preset.text_dim, preset.seed)


def batch_source(run: Run, ds, salt: int):
    """data(skip) for Run.train: batches on the run's device, this rank's shard of each global batch."""
    def data(skip: int):
        for b in data_mod.batches(ds, run.preset.batch, run.preset.seed + salt, run.dp_rank, run.dp_world, skip):
            yield run.to_run(b)
    return data


def frozen_copy(model, run: Run):
    """A frozen copy for teacher use: eval mode, no gradients, bf16 weights on CUDA (it only runs forwards)."""
    t = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
    if run.device.type == "cuda":
        t = t.to(dtype=torch.bfloat16)
    return t


def add_lora(model, rank: int, seed: int = 0) -> None:
    """LoRA (peft, through diffusers' PeftAdapterMixin) on the attention projections; only its weights train.
    The random init of LoRA A comes from `seed`, not from the global generator, so that a run (and its resume)
    starts from the same weights whatever ran before in the process."""
    from peft import LoraConfig

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def trainable(model) -> dict:
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the student has no trainable parameters")
    return params


def student(model, run: Run, *, lora_rank: int, strategy=None, timesteps=None):
    """The trained copy: LoRA or full, tilewise enabled with `strategy` (None: dense), gradient checkpointing,
    train mode; wrapped in DDP over the run's process group when there is one."""
    s = copy.deepcopy(unwrap(model))
    if any(p.dtype != run.dtype for p in s.parameters()):
        raise ValueError(f"student: expected a {str(run.dtype).removeprefix('torch.')} model (the run's master "
                         "weights; autocast gives bf16 on CUDA)")
    if lora_rank and not any("lora_" in n for n, _ in s.named_parameters()):
        add_lora(s, lora_rank, run.preset.seed)
    elif not lora_rank:
        s.requires_grad_(True)
    if strategy is not None:
        twd.enable(s, strategy=strategy, tile=None if _has_tile(strategy) else run.preset.tile, timesteps=timesteps)
    if run.preset.gradient_checkpointing:
        s.enable_gradient_checkpointing()
    s.train()
    context_parallel(s, run)
    if run.sharded:
        _fully_shard(s, run)
    elif run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        s = DDP(s, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                process_group=run.group, find_unused_parameters=True)
    return s


def context_parallel(model, run: Run) -> None:
    """Under sequence parallelism: diffusers' context parallelism (Ulysses) on `model` over the run's sequence
    group, with tilewise's plan (tilewise.diffusers.cp_plan), in place. A tilewise-enabled model runs tilewise's
    Ulysses attention; a dense one diffusers' native attention. Its output is whole on every rank."""
    if run.sequence_parallel == 1 or getattr(model, "_parallel_config", None) is not None:
        return
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=run.sequence_parallel, mesh=run.cp_mesh())
    with _accelerator_count_for_cpu():
        model.enable_parallelism(config=config, cp_plan=twd.cp_plan(model))


@contextlib.contextmanager
def _accelerator_count_for_cpu():
    """diffusers 0.42's enable_parallelism names a device `rank % torch.accelerator.device_count()`, a division by
    zero on a machine without an accelerator (a CPU run); there it counts one. The mesh it uses is the one given
    (a gloo mesh on the CPU), so the device it names is not used."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def _fully_shard(model, run: Run) -> None:
    """torch's FSDP2 over the run's group, in place: each block of the transformer's block lists (the ModuleLists
    directly under it: Wan's `blocks`, HunyuanVideo's dual- and single-stream blocks, ...) is one unit, gathered
    for its forward and backward only, then the root (embeddings, norms, heads). Parameters stay float32 master
    weights under bf16 autocast, as on one GPU; gradients are averaged over the ranks, as DDP does."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(run.group, run.device.type)
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def finished(run: Run, stage: str, trained, like):
    """A stage's trained student as a plain model for what follows (a teacher, the next stage's starting point):
    in eval mode without gradient checkpointing. Under FSDP its weights are shards, and under sequence parallelism
    it carries diffusers' context-parallel hooks, so it is then rebuilt from the stage's saved full model
    (`<stage>.safetensors`, written by save_model) in a copy of `like`."""
    if run.sharded or run.sequence_parallel > 1:
        return load_stage_model(run, stage, like)
    out = unwrap(trained)
    out.disable_gradient_checkpointing()
    return out.eval()


def _has_tile(strategy) -> bool:
    return (hasattr(strategy, "tile") and strategy.tile is not None) or (isinstance(strategy, dict) and
                                                                       "tile" in strategy)


def check_routed(model, name: str) -> None:
    """After a forward: the student's sparse attention really ran on tilewise (a dtype or device tilewise does
    not take makes the integration fall back to dense attention, which would train the wrong model)."""
    ctrl = twd.controller(unwrap(model))
    if ctrl is not None and ctrl.calls["tilewise"] == 0:
        raise RuntimeError(f"{name}: no attention call of the student ran on tilewise ({ctrl.calls}); on CUDA "
                           "tilewise needs bf16/fp16 on a Hopper GPU (this run uses bf16 autocast)")


class AttentionOutputs:
    """Forward hooks on a model's self-attention modules (the ones tilewise runs) that keep each layer's latest
    output. Under gradient checkpointing the recomputation in backward overwrites them; the loss has already been
    built from the first forward's tensors, which carry the graph (non-reentrant checkpointing)."""

    def __init__(self, model):
        m = unwrap(model)
        self.outputs = {}
        self.handles = [mod.register_forward_hook(self._hook(i))
                        for i, mod in enumerate(twd.family_of(m).attention_modules(m))]

    def _hook(self, i):
        def hook(module, args, output):
            self.outputs[i] = output
        return hook

    def take(self) -> dict:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def attention_distance(student_out: dict, teacher_out: dict) -> torch.Tensor:
    """Mean over layers of the MSE between the student's and the teacher's attention outputs (every tensor of a
    tuple output: HunyuanVideo's dual-stream blocks return video and text)."""
    terms = []
    for i, s in student_out.items():
        t = teacher_out[i]
        s, t = (s if isinstance(s, tuple) else (s,)), (t if isinstance(t, tuple) else (t,))
        # (at least float32: bf16 under CUDA autocast; a float64 run's stay float64)
        terms += [F.mse_loss(*(x.to(torch.promote_types(x.dtype, torch.float32)) for x in (a, b)))
                  for a, b in zip(s, t) if a is not None and b is not None]
    if not terms:
        raise RuntimeError("attention distillation: no attention output was recorded")
    return torch.stack(terms).mean()


class Distillation:
    """A student and its frozen teacher on the same input, with both models' attention outputs captured: what the
    STA fine-tune and Efficient-vDiT's knowledge distillation share."""

    def __init__(self, run: Run, student, teacher):
        self.run, self.student, self.teacher = run, student, teacher
        context_parallel(teacher, run)  # its attention outputs then hold the same sequence part as the student's
        self.s_hooks, self.t_hooks = AttentionOutputs(student), AttentionOutputs(teacher)

    def __call__(self, x, sigma, batch, w_attn: float):
        """(student velocity, teacher velocity, w_attn x their attention-output distance or 0)."""
        with self.run.autocast():
            with torch.no_grad():
                v_t = models.call(self.teacher, x, sigma, batch).to(self.run.dtype)
            a_t = self.t_hooks.take()
            v_s = models.call(self.student, x, sigma, batch).to(self.run.dtype)
            a_s = self.s_hooks.take()
        if not w_attn:
            return v_s, v_t, 0.0
        return v_s, v_t, w_attn * self._whole_sequence(attention_distance(a_s, a_t))

    def _whole_sequence(self, part: torch.Tensor) -> torch.Tensor:
        """The attention distance of the whole sequence from this rank's part (under sequence parallelism the
        hooks see only it). Its value is the mean over the sample's ranks (equal parts: diffusers splits evenly);
        its gradient is the part's / P, so that the P-fold loss of Run.train gives each part its share once."""
        P = self.run.sequence_parallel
        if P == 1:
            return part
        import torch.distributed as dist

        whole = part.detach().clone()
        dist.all_reduce(whole, group=self.run.cp_mesh()["ulysses"].get_group())
        return part / P + (whole / P - part / P).detach()

    def train(self, stage: str, steps: int, loss_fn, data, lora_rank: int, lr: Optional[float] = None) -> None:
        """Runs the stage (lr: None for the preset's), then removes the hooks and saves the student."""
        self.run.train(stage, steps=steps, params=trainable(self.student), loss_fn=loss_fn, data=data, lr=lr)
        self.s_hooks.remove()
        self.t_hooks.remove()
        self.run.save_model(stage, self.student, {"stage": stage, "lora_rank": lora_rank})


def pretrain(run: Run, model, ds):
    """Dense flow-matching on the data, so that a random-initialised teacher becomes a model of the data (the
    presets have no pretrained weights). Stage "pretrain"; returns the trained dense model."""
    p = run.preset
    s = student(model, run, lora_rank=0)
    params = trainable(s)
    g = run.generator(1)

    def loss_fn(step, batch):
        x0 = batch["latents"]
        noise = run.batch_randn(g, x0.shape)
        sigma = run.batch_rand(g, x0.shape[:1])
        with run.autocast():
            v = models.call(s, flow.noised(x0, noise, sigma), sigma, batch)
        return F.mse_loss(v.to(run.dtype), flow.flow_matching_target(x0, noise))

    run.train("pretrain", steps=p.pretrain_steps, params=params, loss_fn=loss_fn, data=batch_source(run, ds, 1))
    run.save_model("pretrain", s, {"stage": "pretrain"})
    return finished(run, "pretrain", s, model)


def base_model(run: Run, model_dir, ds):
    """The teacher's starting point: the preset's model (or --model), pretrained densely when the preset asks."""
    m = models.build_model(run.preset, model_dir).to(run.device, run.dtype)
    if run.preset.pretrain_steps > 0:
        m = pretrain(run, m, ds)
    return m.eval()


def load_stage_model(run: Run, stage: str, like) -> Optional[torch.nn.Module]:
    """The final model a previous stage wrote in the output folder, loaded into a copy of `like` (same
    structure: LoRA layers added when the state dict has them), or None when that stage has not run."""
    path = Path(run.out) / f"{stage}.safetensors"
    if not path.exists():
        return None
    state, meta = load_tensors(path)
    m = copy.deepcopy(unwrap(like))
    if any("lora_" in k for k in state) and not any("lora_" in n for n, _ in m.named_parameters()):
        add_lora(m, int(meta.get("lora_rank", "0")) or _lora_rank(state))
    m.load_state_dict(state)
    return m.to(run.device, run.dtype).eval()


def _lora_rank(state: dict) -> int:
    for k, v in state.items():
        if "lora_A" in k:
            return int(v.shape[0])
    return 0


@torch.no_grad()
def proxy_error(run: Run, ds, reference, ref_sigmas, candidates: dict) -> dict:
    """The honest quality proxy without pretrained weights: from the same noise and text, the relative squared
    error ||x - x_ref||^2 / ||x_ref||^2 of each candidate's sample (model, sigmas) against the reference's
    (the dense teacher with many steps). Mean over eval_samples samples."""
    p = run.preset
    g = run.generator(99)
    ref_err = {name: [] for name in candidates}
    for i in range(p.eval_samples):
        b = run.to_run({k: v[None] for k, v in ds[i % len(ds)].items()})
        noise = run.randn(g, b["latents"].shape)
        x_ref = flow.sample(reference, noise, b, ref_sigmas, run.autocast)
        for name, (model, sig) in candidates.items():
            x = flow.sample(model, noise, b, sig, run.autocast)
            ref_err[name].append(float(((x - x_ref) ** 2).sum() / (x_ref ** 2).sum()))
    return {name: sum(v) / len(v) for name, v in ref_err.items()}


@torch.no_grad()
def heldout_flow_loss(run: Run, ds, named_models: dict, samples: int) -> dict:
    """Flow-matching loss of each model on the same samples, noise and noise levels (8 levels per sample): how well
    each one models the data, independent of the teacher (the STA student learns the data too)."""
    g = run.generator(98)
    out = {name: 0.0 for name in named_models}
    for i in range(samples):
        b = run.to_run({k: v[None].expand(8, *v.shape) for k, v in ds[len(ds) - 1 - i % len(ds)].items()})
        x0 = b["latents"]
        noise = run.randn(g, x0.shape)
        sigma = (torch.arange(8, device=run.device) + 0.5) / 8
        x = flow.noised(x0, noise, sigma)
        for name, m in named_models.items():
            with run.autocast():
                v = models.call(m, x, sigma, b).to(run.dtype)
            out[name] += float(F.mse_loss(v, flow.flow_matching_target(x0, noise))) / samples
    return out
