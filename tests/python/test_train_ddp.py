"""The training recipes under DDP, FSDP and sequence parallelism: `torchrun --nproc-per-node 2` of the CLI on the
CPU (gloo), as a user runs it.

The oracle is one process with the same global batch (2 x --batch): every rank takes its half of each global
batch and of its noise and noise levels, the loss is a mean over the rank's equal half, and DDP averages the
gradients, so the two runs make the same AdamW steps up to rounding. Both run in float64 (--dtype float64), so
that rounding is far below the tolerances (derived at TOL_MOMENTS). Also: only rank 0 writes into the output folder (an audit hook in each rank records every
write-mode open, rename, mkdir and remove under it), summary.json is complete, a DDP run interrupted after a
checkpoint and resumed gives the uninterrupted DDP run's weights exactly, and the evdit recipe finishes in 2
processes. Each test draws a fresh --seed (printed).

The processes run this file (`python test_train_ddp.py --ddp-worker AUDIT_DIR [--die-at-checkpoint N] CLI ARGS`)."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")
pytest.importorskip("diffusers", reason="diffusers is not installed (see requirements-torch.txt)")
pytest.importorskip("peft", reason="peft is not installed (see requirements-torch.txt)")

from tilewise.train import cli  # noqa: E402
from tilewise.train.loop import load_tensors  # noqa: E402

WORLD = 2
STEPS = 4
PER_RANK_BATCH = 2
# The two runs differ only in rounding: matmuls over 2 samples instead of 4 (1 thread per rank), and the gradient
# summed over 2 samples then averaged over 2 ranks instead of summed over 4. In float32 that rounding broke the
# moments check now and then, in elements whose gradient is a sum with heavy cancellation (seed 422339844,
# fsdp_sequence: blocks.0.attn1.to_q.bias's first moment 2.4e-8 off against 1.3e-8 allowed; seed 184886900, fsdp:
# blocks.1.attn1.to_v.weight's). In float64 (7 seeds x 4 modes) the moments agree to <= 1.5e-6 of each tensor's
# largest, and all those beyond 1e-7 are of the affine parameters of diffusers' FP32LayerNorm (norm2), which
# computes in float32 whatever the model's dtype (the other tensors differ through them). So the runs are float64
# and the tolerance is 1e-4 of the tensor's largest moment. The weights: AdamW moves an element by about lr (2e-3) per step
# whatever its gradient's scale, so a run on other data or noise differs by ~1e-3 after 4 steps; an element whose
# gradient is near rounding level can take a visibly different step (in float32 up to 9e-6 over 5 seeds; in float64
# <= 1.3e-7 over the 28 runs above); the tolerance is 1e-4 = lr / 20, between the two. Such an element's step is
# AdamW's normalised update, so it can differ by up to 2 lr a step: in float32, seed 889990618 (sequence
# parallelism) moved 1 of 512 elements of the time embedding by 2e-4 = lr / 10 with every moment agreeing to 7e-5
# of its tensor's largest. So at most TOL_WEIGHTS_OUTLIERS of a tensor's elements may exceed TOL_WEIGHTS, and none
# the 2 lr per step AdamW can move a weight by; the moments stay the strict check.
TOL_MOMENTS = 1e-4
TOL_WEIGHTS = 1e-4
TOL_WEIGHTS_OUTLIERS = 0.01
TOL_LOSS_REL = 1e-5  # the logged rank-mean loss: the same forward in two batch splits (measured ~1e-7)


def _seed():
    """A fresh seed per run (printed); TILEWISE_TEST_SEED=N replays a failure's."""
    seed = int(os.environ.get("TILEWISE_TEST_SEED") or random.SystemRandom().randrange(1 << 30))
    print("seed", seed)
    return seed


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))


def _torchrun(audit: Path, args: list, *, die_at_checkpoint: int = 0, timeout: float = 120.0):
    """Runs the CLI with `args` in WORLD processes; returns (return code, log, each rank's writes under --out)."""
    audit.mkdir(parents=True, exist_ok=True)
    for f in audit.glob("rank*.json"):
        f.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", __file__,
           "--ddp-worker", str(audit), "--die-at-checkpoint", str(die_at_checkpoint), *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    writes = [json.loads((audit / f"rank{k}.json").read_text()) for k in range(WORLD)]
    return r.returncode, r.stdout + r.stderr, writes


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == {"stages"}
    for name, entry in s["stages"].items():
        assert set(entry) == {"first_loss", "last_loss", "steps"}, name
        assert math.isfinite(entry["first_loss"]) and math.isfinite(entry["last_loss"]), (name, entry)
    return s["stages"]


def _assert_only_rank0_wrote(writes: list, out: Path, expected: list) -> None:
    assert all(not w for w in writes[1:]), f"ranks other than 0 wrote into {out}: {writes[1:]}"
    written = {Path(p).relative_to(out).as_posix() for _, p in writes[0]}
    assert set(expected) <= written, (expected, sorted(written))  # the audit does see rank 0's files


# How the 2 ranks split the work: (extra CLI args, samples per rank per step). The one-process oracle always runs
# the global batch of WORLD x PER_RANK_BATCH samples.
MODES = {
    "ddp": (["--parallel", "ddp"], PER_RANK_BATCH),
    # FSDP (torch's fully_shard per block): shards are gathered into whole tensors for the checkpoints and the
    # final model, and a resume shards them again, so every assertion holds unchanged
    "fsdp": (["--parallel", "fsdp"], PER_RANK_BATCH),
    # sequence parallelism: both ranks take every sample, each half of its sequence (diffusers' context
    # parallelism, tilewise's Ulysses attention), so each rank's batch is the global one
    "sequence": (["--sequence-parallel", str(WORLD)], WORLD * PER_RANK_BATCH),
    # both: the two ranks shard the weights and split each sample's sequence
    "fsdp_sequence": (["--parallel", "fsdp", "--sequence-parallel", str(WORLD)], WORLD * PER_RANK_BATCH),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_sta_ddp_equals_one_process_and_resumes(tmp_path, mode):
    seed = _seed()
    # one calibration step: its windows hold at every noise level. With per-step windows a forward uses the
    # windows of its batch's largest timestep (tilewise.diffusers' step index), so a rank's half of the batch
    # could get other windows than the whole batch and the runs would differ by design, not by rounding.
    common_args = ["sta", "--preset", "tiny", "--device", "cpu", "--quiet", "--steps", str(STEPS), "--save-every",
                   "2", "--eval-samples", "0", "--teacher-steps", "1", "--segments", "1", "--seed", str(seed),
                   "--dtype", "float64"]
    one = tmp_path / "one"
    assert cli.main(common_args + ["--batch", str(WORLD * PER_RANK_BATCH), "--out", str(one)]) == 0

    ddp = tmp_path / "ddp"
    extra, per_rank = MODES[mode]
    ddp_args = common_args + ["--batch", str(per_rank), *extra, "--out", str(ddp)]
    rc, log, writes = _torchrun(tmp_path / "audit", ddp_args)
    assert rc == 0, f"seed {seed}:\n{log[-4000:]}"
    _assert_only_rank0_wrote(writes, ddp, ["summary.json", "sta.safetensors", "strategy.json",
                                           "checkpoints/sta.safetensors"])
    stages = _summary(ddp)
    assert list(stages) == ["sta"] and stages["sta"]["steps"] == STEPS
    # the calibration (rank 0's, broadcast) is the single process's: same generator, same sample
    assert json.loads((ddp / "strategy.json").read_text()) == json.loads((one / "strategy.json").read_text())

    (w_one, _), (w_ddp, _) = load_tensors(one / "sta.safetensors"), load_tensors(ddp / "sta.safetensors")
    print("max |w_ddp - w_one|", max(float((w_one[k] - w_ddp[k]).abs().max()) for k in w_one))
    assert w_one.keys() == w_ddp.keys()
    (c_one, m_one), (c_ddp, m_ddp) = (load_tensors(d / "checkpoints" / "sta.safetensors") for d in (one, ddp))
    lr = json.loads(m_one["param_groups"])[0]["lr"]
    for k in w_one:
        diff = (w_ddp[k] - w_one[k]).abs()
        over = int((diff > TOL_WEIGHTS).sum())
        assert over <= TOL_WEIGHTS_OUTLIERS * diff.numel() or over <= 1, \
            f"seed {seed}: {k}: {over} of {diff.numel()} elements differ by more than {TOL_WEIGHTS}"
        assert float(diff.max()) <= 2 * lr * STEPS, f"seed {seed}: {k}: max |w_ddp - w_one| {float(diff.max())}"
    for k in c_one:
        if k.startswith("optim/"):  # the averaged gradient is the single process's
            torch.testing.assert_close(c_ddp[k], c_one[k], rtol=0, atol=TOL_MOMENTS * float(c_one[k].abs().max()),
                                       msg=lambda m: f"seed {seed}: {k}: {m}")
    assert torch.equal(c_ddp["rng/gen2"], c_one["rng/gen2"])  # every rank drew the whole batch's noise
    torch.testing.assert_close(torch.tensor(json.loads(m_ddp["losses"])), torch.tensor(json.loads(m_one["losses"])),
                               rtol=TOL_LOSS_REL, atol=0)

    # interrupted right after the checkpoint of step 2 (every rank, once rank 0 wrote it), then --resume: rank 0's
    # checkpoint restores every rank, and the result is the uninterrupted DDP run's, bit for bit
    part = tmp_path / "part"
    part_args = ddp_args[:-1] + [str(part)]
    rc, log, _ = _torchrun(tmp_path / "audit", part_args, die_at_checkpoint=2)
    assert rc != 0 and "interrupted at checkpoint 2" in log, log[-4000:]
    assert load_tensors(part / "checkpoints" / "sta.safetensors")[1]["step"] == "2"
    rc, log, writes = _torchrun(tmp_path / "audit", part_args + ["--resume"])
    assert rc == 0, f"seed {seed}:\n{log[-4000:]}"
    _assert_only_rank0_wrote(writes, part, ["summary.json", "sta.safetensors"])
    w_part, _ = load_tensors(part / "sta.safetensors")
    for k in w_ddp:
        torch.testing.assert_close(w_part[k], w_ddp[k], rtol=0, atol=0, msg=lambda m: f"seed {seed}: {k}: {m}")
    assert _summary(part) == stages


@pytest.mark.parametrize("mode", list(MODES))
def test_evdit_ddp_runs(tmp_path, mode):
    """Every stage in 2 processes; under FSDP and sequence parallelism with a dense pretraining stage too, so both
    hand-offs of a sharded or context-parallel student to the next stage (pretrain -> teacher, mlcd -> few-step
    model) run."""
    seed = _seed()
    out = tmp_path / "evdit"
    rc, log, writes = _torchrun(tmp_path / "audit", [
        "evdit", "--preset", "tiny", "--device", "cpu", "--quiet", "--steps", "3", "--seed", str(seed),
        *MODES[mode][0], "--pretrain-steps", "0" if mode == "ddp" else "2", "--out", str(out)])
    assert rc == 0, f"seed {seed}:\n{log[-4000:]}"
    _assert_only_rank0_wrote(writes, out, ["summary.json", "search.json", "mlcd.safetensors", "kd.safetensors",
                                           "eval.json"])
    stages = _summary(out)
    assert list(stages) == ([] if mode == "ddp" else ["pretrain"]) + ["mlcd", "search", "kd"]
    assert stages["mlcd"]["steps"] == stages["kd"]["steps"] == 3
    ev = json.loads((out / "eval.json").read_text())["rel_error"]
    assert all(math.isfinite(v) for v in ev.values()), ev


# --- the worker (one per rank, started by torchrun) ---

def _audit_writes(out: str, writes: list):
    """An audit hook that appends (event, path) for every write-mode open, rename, mkdir and remove under out."""
    out = os.path.abspath(out)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open":
            path = args[0] if args[2] & write_flags else None
        elif event == "os.rename":
            path = args[1]
        elif event in ("os.mkdir", "os.remove", "os.rmdir"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path == out or path.startswith(out + os.sep):
                writes.append((event, path))
    return hook


def _worker(argv: list) -> int:
    audit, die_at = Path(argv[0]), int(argv[2])
    argv = argv[3:]
    writes = []
    sys.addaudithook(_audit_writes(argv[argv.index("--out") + 1], writes))
    if die_at:
        from tilewise.train import loop

        save = loop.Run._save

        def save_then_die(self, path, stage, step, *a, **kw):
            save(self, path, stage, step, *a, **kw)
            if step == die_at:
                torch.distributed.barrier(group=self.group)  # rank 0 has written the checkpoint
                raise SystemExit(f"interrupted at checkpoint {step}")
        loop.Run._save = save_then_die
    try:
        return cli.main(argv)
    finally:
        (audit / f"rank{os.environ['RANK']}.json").write_text(json.dumps(writes))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--ddp-worker":
    sys.exit(_worker(sys.argv[2:]))
