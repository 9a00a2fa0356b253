"""`tilewise train sta|evdit --preset NAME --device cpu|cuda --out DIR [...]` (also `python -m tilewise.train`).

Every option overrides one field of the preset (tilewise.train.PRESETS). Mistakes on the command line or in input
files print one line (`tilewise: error: ...`) and exit 2. Under torchrun (WORLD_SIZE > 1) the process group is
initialised here (NCCL on CUDA, one GPU per LOCAL_RANK) and the recipe trains with DDP."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from tilewise._cli_common import Parser as _Parser
from tilewise._cli_common import UsageError, main_reporting_errors


def _triple(text: str, name: str) -> tuple:
    try:
        t = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        t = ()
    if len(t) != 3 or min(t) < 1:
        raise UsageError(f"invalid {name} = {text!r}: expected KTxKHxKW with three positive integers, e.g. 3x3x3")
    return t


def _floats(text: str, name: str, n: int) -> tuple:
    try:
        t = tuple(float(x) for x in text.split(","))
    except ValueError:
        t = ()
    if len(t) != n or min(t) < 0:
        raise UsageError(f"invalid {name} = {text!r}: expected {n} comma-separated numbers >= 0")
    return t


def build_parser() -> argparse.ArgumentParser:
    from tilewise.train.models import PRESETS

    ap = _Parser(prog="tilewise train", description="STA fine-tuning and Efficient-vDiT training recipes "
                 "(docs/training.md).")
    ap.add_argument("recipe", choices=["sta", "evdit"])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--device", required=True, help="cpu or cuda (cuda:N)")
    ap.add_argument("--out", required=True, help="output folder (summary.json, checkpoints, models)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out (finished stages are kept)")
    ap.add_argument("--data", help="folder of .safetensors samples (latents, text); default: synthetic")
    ap.add_argument("--model", help="a diffusers transformer folder instead of the preset's random model")
    ap.add_argument("--stages", default="mlcd,search,kd", help="evdit: stages to run (default: all, in order)")
    ap.add_argument("--steps", type=int, help="optimizer steps of every training stage")
    for stage in ("pretrain", "sta", "mlcd", "kd"):
        ap.add_argument(f"--{stage}-steps", type=int, help=f"optimizer steps of the {stage} stage")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--distill-lr", type=float, help="evdit: learning rate of mlcd and kd (default: the preset's, "
                    "else --lr)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--tile", help="TTxTHxTW")
    ap.add_argument("--window", help="sta: one fixed window KTxKHxKW for every layer and head")
    ap.add_argument("--calibrate", help="sta: candidate windows (1x3x3,3x3x3,...) for a live calibration")
    ap.add_argument("--budget", type=float, help="sta: rel_mse budget of --calibrate")
    ap.add_argument("--strategy", help="a tilewise strategy JSON (sta: windows; evdit kd: the attention tile)")
    ap.add_argument("--weights", help="loss weights DATA,ATTN,FINAL (flow matching, attention outputs, final layer)")
    ap.add_argument("--lora", type=int, metavar="RANK", help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--segments", type=int, help="evdit mlcd: trajectory segments")
    ap.add_argument("--student-steps", type=int, help="evdit: sampling steps of the student (multiple of segments)")
    ap.add_argument("--teacher-steps", type=int, help="the teacher's Euler steps (multiple of segments)")
    ap.add_argument("--threshold", type=float, help="evdit search: largest loss of a layer's frame pattern")
    ap.add_argument("--radius", type=int, help="evdit search: local radius of the attention tile")
    ap.add_argument("--eval-samples", type=int, help="samples of the proxy error (0: none)")
    ap.add_argument("--save-every", type=int, help="checkpoint period in steps")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                    help="under torchrun: DistributedDataParallel (default) or FSDP (torch's fully_shard per block: "
                         "weights, gradients and AdamW state sharded, for models that do not fit one GPU)")
    ap.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                    help="under torchrun: N ranks share each sample, each holding 1/N of its sequence (diffusers' "
                         "context parallelism, tilewise's Ulysses attention); the world size must be a multiple")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="master weights and losses (float64: CPU only, a reference run for tests)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return ap


def preset_from_args(args):
    from tilewise.train.models import PRESETS

    p = PRESETS[args.preset]
    kw = {}
    for name in ("lr", "distill_lr", "batch", "seed", "budget", "segments", "student_steps", "teacher_steps", "threshold",
                 "radius", "eval_samples", "save_every", "gradient_checkpointing"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.steps is not None:
        kw.update(sta_steps=args.steps, mlcd_steps=args.steps, kd_steps=args.steps)
    for stage in ("pretrain", "sta", "mlcd", "kd"):
        if getattr(args, f"{stage}_steps") is not None:
            kw[f"{stage}_steps"] = getattr(args, f"{stage}_steps")
    for name in ("sta_steps", "mlcd_steps", "kd_steps", "batch", "teacher_steps", "segments", "student_steps",
                 "save_every"):
        if name in kw and kw[name] < 1:
            raise UsageError(f"invalid --{name.replace('_', '-')} = {kw[name]}: expected an integer >= 1")
    for name in ("pretrain_steps", "eval_samples", "radius"):
        if name in kw and kw[name] < 0:
            raise UsageError(f"invalid --{name.replace('_', '-')} = {kw[name]}: expected an integer >= 0")
    for name in ("lr", "distill_lr"):
        if name in kw and not kw[name] > 0:
            raise UsageError(f"invalid --{name.replace('_', '-')} = {kw[name]}: expected a number > 0")
    if args.tile:
        kw["tile"] = _triple(args.tile, "--tile")
    if args.window:
        kw.update(window=_triple(args.window, "--window"), calibrate=None)
    if args.calibrate:
        kw.update(calibrate=[_triple(c, "--calibrate") for c in args.calibrate.split(",")], window=None)
    if args.window and args.calibrate:
        raise UsageError("--window and --calibrate: give one of them (a fixed window, or candidates to calibrate)")
    if args.weights:
        kw["loss_weights"] = _floats(args.weights, "--weights", 3)
    if args.lora is not None:
        if args.lora < 0:
            raise UsageError(f"invalid --lora = {args.lora}: expected a rank >= 0 (0: full fine-tuning)")
        kw["lora_rank"] = args.lora
    p = p.replace(**kw)
    if p.teacher_steps % p.segments or p.student_steps % p.segments:
        raise UsageError(f"invalid --segments = {p.segments}: --teacher-steps ({p.teacher_steps}) and "
                         f"--student-steps ({p.student_steps}) must be multiples of it")
    return p


def _process_group(device: str):
    """torchrun: (process group, this rank's device); else (None, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.group.WORLD, device


def run(argv: Sequence[str], stream=None) -> int:
    args = build_parser().parse_args(list(argv))
    preset = preset_from_args(args)
    for name in ("data", "model", "strategy"):
        value = getattr(args, name)
        if value is not None and not os.path.exists(value):
            raise UsageError(f"invalid --{name} = {value!r}: no such file or folder")
    if args.recipe == "evdit":
        from tilewise.train.evdit import parse_stages
        parse_stages(args.stages)
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise UsageError(f"invalid --device = {args.device!r}: expected cpu or cuda")
    if args.dtype == "float64" and args.device != "cpu":
        raise UsageError(f"invalid --dtype = float64 with --device {args.device}: float64 runs on the CPU only "
                         "(tilewise's CUDA kernels take bf16 / fp16)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.sequence_parallel < 1 or world % args.sequence_parallel:
        raise UsageError(f"invalid --sequence-parallel = {args.sequence_parallel}: expected a divisor of the number "
                         f"of processes, {world} (torchrun --nproc-per-node)")

    from tilewise.train.loop import Run

    stream = stream or sys.stderr
    group, device = _process_group(args.device)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"tilewise train: {msg}", file=stream))
    try:
        r = Run(args.out, device, preset, resume=args.resume, process_group=group, progress=not args.quiet,
                stream=stream, log=log, parallel=args.parallel, sequence_parallel=args.sequence_parallel,
                dtype=args.dtype)
        if args.recipe == "sta":
            from tilewise.train.sta import train_sta
            train_sta(r, data_dir=args.data, model_dir=args.model, strategy_file=args.strategy)
        else:
            from tilewise.train.evdit import train_evdit
            train_evdit(r, stages=args.stages, data_dir=args.data, model_dir=args.model, strategy_file=args.strategy)
    finally:
        if group is not None:
            # A gloo group whose last reference dies at the interpreter's exit aborts it now and then ("terminate
            # called without an active exception"). FSDP modules and device meshes hold groups in reference
            # cycles, so collect them while the groups are alive, then destroy every group.
            import gc

            import torch.distributed as dist
            r = None
            gc.collect()
            dist.destroy_process_group()
    log(f"wrote {os.path.join(args.out, 'summary.json')}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_reporting_errors(run, argv, import_hint="install the training dependencies "
                                                        "(pip install -r requirements-torch.txt)")


if __name__ == "__main__":
    sys.exit(main())
