"""What every recipe stage shares: the output folder, device and precision, the distributed context, the training
loop with its progress bar, atomic safetensors checkpoints and resume, and summary.json.

Output folder:
  summary.json                  {"stages": {"<stage>": {"first_loss": x, "last_loss": y, "steps": n}, ...}}
  checkpoints/<stage>.safetensors  trainable weights, optimizer state, EMA, RNG, loss history (metadata);
                                rewritten atomically every save_every steps and at the end of the stage (then
                                marked done, so a resumed run skips the stage and reloads its weights)
  <stage>.safetensors           the stage's final model (full state dict of the student)
A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over the old one: a
job killed at any moment leaves the previous checkpoint or the new one, never a torn file."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

SUMMARY = "summary.json"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then flush and rename over `path` (same folder, so the rename is atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # the rename itself reaches the disk with the folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata={k: str(v) for k, v in metadata.items()}))


def load_tensors(path: Path) -> tuple:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_metadata(path: Path) -> dict:
    """A safetensors file's metadata, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (FSDP2's fully_shard shards in place: no wrapper)."""
    return model.module if hasattr(model, "module") else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded one (a DTensor: a collective, so every rank calls it, in the same
    order), else t itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (the whole tensor, on every rank) sharded as `target` is when target is a DTensor, else full."""
    if not _is_dtensor(target):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=target.device, dtype=target.dtype), target.device_mesh, target.placements)


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class Run:
    """One recipe run: output folder, device, precision, process group, summary.

    process_group: None for one process, or a torch.distributed process group (the recipes then train the student
    with `parallel` over it: "ddp", DistributedDataParallel, or "fsdp", torch's FSDP2 `fully_shard` per
    transformer block, for models whose weights and AdamW state do not fit one GPU; they shard the batches by
    rank, and only rank 0 writes files).

    sequence_parallel: N > 1 makes groups of N consecutive ranks share each sample, each rank holding 1/N of its
    sequence (diffusers' context parallelism with tilewise's Ulysses attention); the data-parallel rank and world
    (dp_rank, dp_world = rank // N, world // N) then shard the data.

    A step's global batch is dp_world x preset.batch samples and every rank computes what one process with that
    batch would, on its shard: its rows of the data (data.batches), of the noise and of the noise levels (the
    batch_* draws below), with a loss that is a mean over its equal shard, which the gradient average of DDP or
    FSDP turns into the mean over the global batch (with sequence parallelism, after the loss's factor N in
    `train`). So the run follows the single-process one up to float rounding."""

    PARALLEL = ("ddp", "fsdp")
    # the master weights' and the losses' precision: float32, or float64 on the CPU for reference runs (a parallel
    # run then follows the single-process one up to float64 rounding: tests/python/test_train_ddp.py)
    DTYPES = {"float32": torch.float32, "float64": torch.float64}

    def __init__(self, out, device: str, preset, *, resume: bool = False, process_group=None, progress: bool = True,
                 stream=None, log: Optional[Callable[[str], None]] = None, parallel: str = "ddp",
                 sequence_parallel: int = 1, dtype: str = "float32"):
        if parallel not in self.PARALLEL:
            raise ValueError(f"invalid parallel = {parallel!r}: expected one of {', '.join(self.PARALLEL)}")
        self.parallel = parallel
        self.out, self.preset, self.resume = Path(out), preset, bool(resume)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"invalid device = {device!r}: torch sees no CUDA GPU here; use --device cpu")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"invalid device = {device!r}: expected cpu or cuda")
        if dtype not in self.DTYPES or (dtype == "float64" and self.device.type != "cpu"):
            raise ValueError(f"invalid dtype = {dtype!r}: expected float32, or float64 on the CPU (a reference run: "
                             "tilewise's CUDA kernels take bf16 / fp16)")
        self.dtype = self.DTYPES[dtype]
        self.group = process_group
        if process_group is not None:
            import torch.distributed as dist
            self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)
        else:
            self.rank, self.world = 0, 1
        # Sequence parallelism: groups of `sequence_parallel` consecutive ranks share each sample, every rank holding
        # a part of its sequence (diffusers' context parallelism with tilewise's Ulysses attention); the data
        # parallel rank and world below shard the data and its noise, as the ranks do without it.
        sp = int(sequence_parallel)
        if sp < 1 or self.world % sp:
            raise ValueError(f"invalid sequence_parallel = {sequence_parallel}: expected a divisor of the world size "
                             f"{self.world} (ranks per sample)")
        if sp > 1:
            import torch.distributed as dist
            if self.world != dist.get_world_size():
                raise ValueError("invalid process_group: sequence parallelism needs the whole world (torchrun's) as "
                                 f"its group, got {self.world} of {dist.get_world_size()} ranks")
        self.sequence_parallel = sp
        self.dp_rank, self.dp_world = self.rank // sp, self.world // sp
        self._cp_mesh = None
        self.progress, self.stream = progress, stream
        self.log = log or (lambda msg: None)
        self.ckpt_dir = self.out / "checkpoints"
        self.generators = {}
        if self.rank == 0:
            self._check_out()
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        summary = self.out / SUMMARY
        self.summary = json.loads(summary.read_text()) if self.resume and summary.exists() else {"stages": {}}

    def _check_out(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"invalid out = {str(self.out)!r}: it is a file, expected a folder")
        used = self.out.is_dir() and ((self.out / SUMMARY).exists() or any(self.ckpt_dir.glob("*.safetensors")))
        if used and not self.resume:
            raise ValueError(f"invalid out = {str(self.out)!r}: it already holds a run (summary.json or checkpoints); "
                             "pass --resume to continue it, or choose a new folder")
        self.out.mkdir(parents=True, exist_ok=True)

    # --- precision: bf16 autocast on CUDA (tilewise's CUDA kernel takes bf16 / fp16), float32 on the CPU ---
    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generator(self, salt: int) -> torch.Generator:
        """A generator on the run's device seeded from the preset's seed and a salt, the same on every rank: draws
        over the global batch go through batch_randn / batch_rand / batch_randint, and draws outside training
        (calibration, search, evaluation) give every rank the same result. Checkpoints (rank 0's) save the state
        of every generator of the run and resume restores it on every rank, so a resumed stage draws the same
        noise as an uninterrupted one."""
        g = torch.Generator(device=self.device).manual_seed(self.preset.seed * 100_003 + salt * 1_009)
        self.generators[salt] = g
        return g

    def _rank_rows(self, draw: Callable, shape) -> torch.Tensor:
        """This rank's rows of draw((dp_world * shape[0], *shape[1:])): the global batch's draw, sharded like the
        data (the ranks sharing a sample under sequence parallelism draw the same rows)."""
        b = shape[0]
        return draw((self.dp_world * b, *shape[1:]))[self.dp_rank * b:(self.dp_rank + 1) * b]

    def batch_randn(self, g: torch.Generator, shape) -> torch.Tensor:
        return self._rank_rows(lambda s: self.randn(g, s), shape)

    def batch_rand(self, g: torch.Generator, shape) -> torch.Tensor:
        return self._rank_rows(lambda s: torch.rand(s, generator=g, device=self.device, dtype=self.dtype), shape)

    def randn(self, g: torch.Generator, shape) -> torch.Tensor:
        """A draw outside the global batch's sharding (every rank the same), in the run's precision."""
        return torch.randn(shape, generator=g, device=self.device, dtype=self.dtype)

    def to_run(self, sample: dict) -> dict:
        """A sample or batch on the run's device, its floating tensors in the run's precision."""
        return {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in sample.items()}

    def batch_randint(self, g: torch.Generator, high: int, shape) -> torch.Tensor:
        return self._rank_rows(lambda s: torch.randint(0, high, s, generator=g, device=self.device), shape)

    def from_rank0(self, value):
        """Rank 0's `value` on every rank (a picklable object): decisions that shape the student (calibrated
        windows, searched tiles) must agree across ranks even where a GPU's reductions are not bitwise
        reproducible."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    @property
    def sharded(self) -> bool:
        """Whether students are FSDP-sharded (parallel "fsdp" over more than one process)."""
        return self.parallel == "fsdp" and self.world > 1

    def cp_mesh(self):
        """The ("ring", "ulysses") device mesh of this rank's sequence-parallel group, for diffusers'
        ContextParallelConfig (built once: a (data, 1, sequence) mesh over the world, consecutive ranks per
        sample)."""
        if self._cp_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.dp_world, 1, self.sequence_parallel),
                                    mesh_dim_names=("dp", "ring", "ulysses"))
            self._cp_mesh = mesh["ring", "ulysses"]
        return self._cp_mesh

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier(group=self.group)

    def mean_over_ranks(self, x: float) -> float:
        if self.world == 1:
            return x
        import torch.distributed as dist
        t = torch.tensor([x], device=self.device)
        dist.all_reduce(t, group=self.group)
        return float(t) / self.world

    def write_summary(self, stage: str, first: float, last: float, steps: int) -> None:
        self.summary["stages"][stage] = {"first_loss": first, "last_loss": last, "steps": int(steps)}
        if self.rank == 0:
            text = json.dumps(self.summary, indent=1) + "\n"
            atomic_write(self.out / SUMMARY, lambda tmp: tmp.write_text(text))

    def write_json(self, name: str, value) -> Path:
        path = self.out / name
        if self.rank == 0:
            text = json.dumps(value, indent=1) + "\n"
            atomic_write(path, lambda tmp: tmp.write_text(text))
        return path

    def stage_done(self, stage: str) -> bool:
        path = self.ckpt_dir / f"{stage}.safetensors"
        return self.resume and path.exists() and load_metadata(path).get("done") == "1"

    def save_model(self, stage: str, model, metadata: dict) -> Path:
        """Writes the model's full state dict (on every rank: gathering FSDP shards is a collective; rank 0
        writes) and returns the path once it is there for every rank."""
        path = self.out / f"{stage}.safetensors"
        state = {k: self._whole(v) for k, v in unwrap(model).state_dict().items()}
        if self.rank == 0:
            save_tensors(path, state, metadata)
        self.barrier()
        return path

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self, stage: str, *, steps: int, params: dict, loss_fn: Callable, data: Callable, extra: dict = None,
              after_step: Optional[Callable] = None, lr: Optional[float] = None) -> list:
        """Runs `steps` optimizer steps of loss_fn(step, batch) -> scalar tensor over params {name: Parameter},
        with AdamW, gradient clipping at 1, a tqdm bar, checkpoints every save_every steps and resume. extra:
        {name: tensor} saved and restored with the checkpoint (e.g. an EMA copy, updated in place by
        after_step(step)). data(skip) -> iterator of batches. Returns the loss of every step (rank mean) and
        writes the stage's summary entry."""
        if steps < 1:
            raise ValueError(f"invalid {stage}_steps = {steps}: expected at least 1")
        extra = extra or {}
        opt = torch.optim.AdamW(list(params.values()), lr=lr or self.preset.lr, weight_decay=0.0)
        path = self.ckpt_dir / f"{stage}.safetensors"
        start, losses = 0, []
        if self.resume and path.exists():
            start, losses, done = self._load(path, params, extra, opt)
            if done:
                self.log(f"{stage}: finished in a previous run ({start} steps), weights reloaded")
                self._summarise(stage, losses)
                return losses
            self.log(f"{stage}: resuming at step {start} of {steps}")
        bar = self._bar(stage, steps, start)
        it = data(start)
        window = max(1, self.preset.log_window)
        for step in range(start, steps):
            loss = loss_fn(step, next(it))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{stage}: the loss is {float(loss)} at step {step} (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            # Under sequence parallelism each rank's gradient is its sequence part's share of the sample's: the
            # ranks of a sample must sum them, and DDP / FSDP average over all ranks, hence the factor.
            (loss * self.sequence_parallel if self.sequence_parallel > 1 else loss).backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            if after_step is not None:
                after_step(step)
            losses.append(self.mean_over_ranks(float(loss.detach())))
            if bar is not None:
                bar.set_postfix_str(f"loss {sum(losses[-window:]) / len(losses[-window:]):.4g}", refresh=False)
                bar.update(1)
            last = step + 1 == steps
            if last or (step + 1) % self.preset.save_every == 0:
                self._save(path, stage, step + 1, losses, params, extra, opt, done=last)
        if bar is not None:
            bar.close()
        self._summarise(stage, losses)
        return losses

    def _summarise(self, stage: str, losses: list) -> None:
        w = max(1, min(self.preset.log_window, len(losses) // 2 or 1))
        self.write_summary(stage, sum(losses[:w]) / w, sum(losses[-w:]) / w, len(losses))

    def _bar(self, stage, steps, start):
        if not self.progress or self.rank != 0:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=steps, initial=start, desc=stage, unit="step", file=self.stream, dynamic_ncols=True,
                    mininterval=0.5)

    def _whole(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """t whole for rank 0's file (None on the other ranks): gathering FSDP shards is a collective every rank
        joins, one tensor at a time, each moved to the CPU at once (a sharded model's weights and AdamW moments
        need not fit one GPU whole)."""
        t = full_tensor(t)
        if self.rank != 0:
            return None
        return t.cpu() if self.sharded else t

    def _save(self, path, stage, step, losses, params, extra, opt, done: bool) -> None:
        tensors = {f"param/{k}": self._whole(p) for k, p in params.items()}
        tensors.update({f"extra/{k}": self._whole(t) for k, t in extra.items()})
        state = opt.state_dict()
        scalars = {}
        for i, s in state["state"].items():
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim/{i}/{k}"] = self._whole(v)
                else:
                    scalars[f"{i}/{k}"] = v
        if self.rank != 0:
            return
        tensors["rng/cpu"] = torch.get_rng_state()
        tensors.update({f"rng/gen{salt}": g.get_state() for salt, g in self.generators.items()})
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"stage": stage, "step": step, "done": "1" if done else "0", "losses": json.dumps(losses),
                "param_groups": json.dumps(state["param_groups"]), "optim_scalars": json.dumps(scalars),
                "preset": self.preset.name}
        save_tensors(path, tensors, meta)

    def _load(self, path, params, extra, opt) -> tuple:
        # Tensor by tensor from the file (every rank reads it; a sharded model's whole checkpoint need not fit in
        # one process's memory), each sharded like its target under FSDP.
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys, meta = set(f.keys()), dict(f.metadata() or {})
            missing = [k for k in params if f"param/{k}" not in keys] + [k for k in extra if f"extra/{k}" not in keys]
            if missing or meta.get("preset") != self.preset.name:
                raise ValueError(f"invalid checkpoint {path}: it was written by preset {meta.get('preset')!r} "
                                 f"for other weights (missing {missing[:3]}); expected preset {self.preset.name!r}")
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(shard_like(p, f.get_tensor(f"param/{k}")))
                for k, t in extra.items():
                    t.copy_(shard_like(t, f.get_tensor(f"extra/{k}")))
            plist = list(params.values())  # the optimizer's parameter order
            state = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
            for key in sorted(keys):
                if key.startswith("optim/"):
                    _, i, k = key.split("/", 2)
                    p, v = plist[int(i)], f.get_tensor(key)
                    # AdamW's moments are shaped like their parameter (sharded with it); `step` is a scalar
                    state["state"].setdefault(int(i), {})[k] = shard_like(p, v) if v.shape == p.shape else v
            rng = {k: f.get_tensor(k) for k in keys if k.startswith("rng/")}
        for key, v in json.loads(meta["optim_scalars"]).items():
            i, k = key.split("/", 1)
            state["state"].setdefault(int(i), {})[k] = v
        if state["state"]:
            opt.load_state_dict(state)
        torch.set_rng_state(rng["rng/cpu"])
        for salt, g in self.generators.items():
            if f"rng/gen{salt}" in rng:
                g.set_state(rng[f"rng/gen{salt}"])
        if "rng/cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["rng/cuda"], self.device)
        losses = json.loads(meta["losses"])
        return int(meta["step"]), losses, meta.get("done") == "1"
