"""Training recipes (tilewise.train): both tiny presets end to end through the CLI (every stage, losses decrease,
summary.json as specified), resume after an interruption gives the same weights as an uninterrupted run (LoRA,
fixed windows, dense pretraining), the folder data format, the schedules, the other families' adapters, and
one-line CLI errors. CPU only; the CUDA run skips visibly without a Hopper GPU."""
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (see requirements-torch.txt)")
pytest.importorskip("diffusers", reason="diffusers is not installed (see requirements-torch.txt)")
pytest.importorskip("peft", reason="peft is not installed (see requirements-torch.txt)")

import tilewise.diffusers as twd  # noqa: E402
from tilewise.train import PRESETS, LatentFolder, MovingShapes, Run, export, train_sta  # noqa: E402
from tilewise.train import cli, common, flow, models  # noqa: E402
from tilewise.train.loop import load_tensors  # noqa: E402
from tiny_models import hopper  # noqa: E402

STAGE_KEYS = {"first_loss", "last_loss", "steps"}


def _summary(out):
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == {"stages"}
    for name, entry in s["stages"].items():
        assert set(entry) == STAGE_KEYS, name
    return s["stages"]


def test_tiny_sta_cli(tmp_path):
    out = tmp_path / "sta"
    assert cli.main(["sta", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    stages = _summary(out)
    assert list(stages) == ["sta"] and stages["sta"]["steps"] == PRESETS["tiny"].sta_steps
    assert stages["sta"]["last_loss"] < 0.95 * stages["sta"]["first_loss"]
    strategy = json.loads((out / "strategy.json").read_text())  # calibrated on the teacher
    assert strategy["format"] == "tilewise-strategy" and strategy["windows"]
    assert (out / "sta.safetensors").exists() and load_tensors(out / "checkpoints" / "sta.safetensors")[1]["done"] == "1"
    ev = json.loads((out / "eval.json").read_text())
    # the sparse student learned the data: its held-out flow-matching loss is below the dense teacher's
    assert ev["flow_matching_loss"]["sta_finetuned"] < ev["flow_matching_loss"]["teacher_dense"]


def test_tiny_evdit_cli(tmp_path):
    out = tmp_path / "evdit"
    assert cli.main(["evdit", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    stages = _summary(out)
    assert list(stages) == ["mlcd", "search", "kd"]
    for name in ("mlcd", "kd"):
        assert stages[name]["last_loss"] < 0.8 * stages[name]["first_loss"], name
    # search: the chosen patterns' loss is under the threshold and below the sparsest pattern's
    assert stages["search"]["last_loss"] <= PRESETS["tiny"].threshold < stages["search"]["first_loss"]
    search = json.loads((out / "search.json").read_text())
    T = PRESETS["tiny"].latent[1]
    assert search["frame_patterns"] and all(0 <= g < T for g, _ in search["frame_patterns"].values())
    ev = json.loads((out / "eval.json").read_text())["rel_error"]
    # MLCD made few-step sampling closer to the teacher's many-step samples than the base model's few steps
    assert ev["mlcd_dense_few_step"] < ev["base_few_step"]
    # kd alone on the same folder (resume keeps mlcd and search, retrains nothing else)
    stale = (out / "kd.safetensors").stat().st_mtime_ns
    assert cli.main(["evdit", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--quiet", "--resume",
                     "--stages", "kd", "--eval-samples", "0"]) == 0
    assert (out / "kd.safetensors").stat().st_mtime_ns >= stale and _summary(out)["kd"] == stages["kd"]


def test_distill_lr_reaches_mlcd_and_kd(tmp_path, monkeypatch):
    """--distill-lr is the learning rate of the optimizers of mlcd and kd; pretraining keeps --lr."""
    made = []

    class Recorder(torch.optim.AdamW):
        def __init__(self, params, lr, **kw):
            made.append(lr)
            super().__init__(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    assert cli.main(["evdit", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "o"), "--quiet",
                     "--steps", "1", "--pretrain-steps", "1", "--eval-samples", "0", "--lr", "0.002",
                     "--distill-lr", "0.0123"]) == 0
    assert made == [0.002, 0.0123, 0.0123]  # pretrain, mlcd, kd


class _Interrupt(Exception):
    pass


def _short(**kw):
    return PRESETS["tiny"].replace(window=(1, 1, 1), calibrate=None, sta_steps=8, save_every=3, lora_rank=4,
                                   pretrain_steps=2, eval_samples=0, log_window=2, seed=11, **kw)


def test_resume_matches_uninterrupted_lora(tmp_path, monkeypatch):
    preset = _short()
    whole = tmp_path / "whole"
    train_sta(Run(whole, "cpu", preset, progress=False))

    calls = {"n": 0}
    real = models.call

    def flaky(*a, **kw):  # dies in the middle of sta step 7 (2 calls a step; pretrain: 1 call a step)
        calls["n"] += 1
        if calls["n"] == preset.pretrain_steps + 2 * 7 + 2:
            raise _Interrupt
        return real(*a, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(models, "call", flaky)
    with pytest.raises(_Interrupt):
        train_sta(Run(part, "cpu", preset, progress=False))
    monkeypatch.setattr(models, "call", real)
    meta = load_tensors(part / "checkpoints" / "sta.safetensors")[1]
    assert (meta["step"], meta["done"]) == ("6", "0")
    assert not list((part / "checkpoints").glob(".*tmp*"))  # no torn temporary file left
    with pytest.raises(ValueError, match="already holds a run"):
        train_sta(Run(part, "cpu", preset, progress=False))
    train_sta(Run(part, "cpu", preset, resume=True, progress=False))

    a, _ = load_tensors(whole / "sta.safetensors")
    b, _ = load_tensors(part / "sta.safetensors")
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert _summary(whole) == _summary(part)
    lora = {k: v for k, v in a.items() if "lora_B" in k}  # LoRA B starts at random values ("gaussian" init) and moved
    assert lora and all(torch.isfinite(v).all() for v in lora.values())


def test_folder_data_roundtrip_and_training(tmp_path):
    ds = MovingShapes(3, (4, 4, 16, 16), 4, 16, seed=int(torch.randint(0, 1 << 30, ())))
    export(ds, tmp_path / "data")
    folder = LatentFolder(tmp_path / "data")
    assert len(folder) == 3
    for i in range(3):
        for k in ("latents", "text"):
            torch.testing.assert_close(folder[i][k], ds[i][k], rtol=0, atol=0)
    # moving: consecutive frames differ but are correlated; conditioning differs per sample
    x = ds[0]["latents"]
    assert x.std() > 0.05 and not torch.equal(x[:, 0], x[:, 1])
    assert not torch.allclose(ds[0]["text"], ds[1]["text"])
    out = tmp_path / "run"
    assert cli.main(["sta", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--quiet", "--data",
                     str(tmp_path / "data"), "--window", "1x1x1", "--steps", "3", "--eval-samples", "0"]) == 0
    assert _summary(out)["sta"]["steps"] == 3


def test_schedules():
    sig = flow.student_sigmas(8, 2, 4, shift=3.0)
    teacher, bounds = flow.segment_sigmas(8, 2, 3.0)
    assert len(sig) == 5 and float(sig[0]) == 1.0 and float(sig[-1]) == 0.0
    assert torch.all(sig[1:] < sig[:-1])
    for b in bounds:  # every segment boundary of the teacher is a student step
        assert torch.isclose(sig, teacher[b]).any()
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    s = torch.rand(2)
    torch.testing.assert_close(flow.consistency(v, x, s, s), x)  # boundary condition
    with pytest.raises(ValueError, match="multiple of segments"):
        flow.student_sigmas(8, 3, 3, 1.0)


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan"])
def test_other_families_train_step(family):
    """The adapters and the student set-up on CogVideoX and HunyuanVideo: one STA loss with attention distillation
    through tilewise, gradients reach the weights."""
    from tiny_models import build
    model, inputs = build(family)
    preset = PRESETS["tiny"].replace(family=family, window=(1, 1, 1), tile=(1, 4, 4))
    run = Run.__new__(Run)  # no output folder: only what student() and autocast() read
    run.preset, run.device, run.dtype, run.world = preset, torch.device("cpu"), torch.float32, 1
    run.parallel, run.sequence_parallel = "ddp", 1
    latents = inputs["hidden_states"] if family == "hunyuan" else inputs["hidden_states"].transpose(1, 2)
    batch = {"text": inputs["encoder_hidden_states"]}
    if family == "hunyuan":
        batch.update(text_mask=inputs["encoder_attention_mask"], pooled=inputs["pooled_projections"])
    s = common.student(model, run, lora_rank=0, strategy={"window": (1, 1, 1), "tile": (1, 4, 4)})
    hooks_s, hooks_t = common.AttentionOutputs(s), common.AttentionOutputs(model)
    sigma = torch.rand(latents.shape[0])
    with torch.no_grad():
        v_t = models.call(model, latents, sigma, batch)
    v_s = models.call(s, latents, sigma, batch)
    assert v_s.shape == latents.shape and twd.controller(s).calls["tilewise"] > 0
    loss = torch.nn.functional.mse_loss(v_s, v_t) + common.attention_distance(hooks_s.take(), hooks_t.take())
    loss.backward()
    assert loss > 0 and all(p.grad is not None for n, p in s.named_parameters() if "to_q" in n)


def test_evdit_float64_reference_run(tmp_path):
    """--dtype float64 (the reference runs of test_train_ddp.py): every stage trains, samples and evaluates in
    float64 (weights, moments, losses), through the same code as float32."""
    out = tmp_path / "evdit64"
    assert cli.main(["evdit", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--quiet", "--steps", "2",
                     "--eval-samples", "1", "--dtype", "float64"]) == 0
    stages = _summary(out)
    assert list(stages) == ["mlcd", "search", "kd"]
    weights, _ = load_tensors(out / "kd.safetensors")
    assert weights and all(t.dtype == torch.float64 for t in weights.values() if t.is_floating_point())
    ckpt, _ = load_tensors(out / "checkpoints" / "kd.safetensors")
    moments = [t for k, t in ckpt.items() if k.startswith("optim/") and t.is_floating_point() and t.ndim > 0]
    assert moments and all(t.dtype == torch.float64 for t in moments)
    assert all(v == v for v in json.loads((out / "eval.json").read_text())["rel_error"].values())  # no NaN


@pytest.mark.parametrize("args, message", [
    (["sta", "--preset", "nope", "--device", "cpu", "--out", "X"], "invalid choice: 'nope'"),
    (["sta", "--preset", "tiny", "--device", "cpu", "--out", "X", "--window", "3x3"], "invalid --window = '3x3'"),
    (["evdit", "--preset", "tiny", "--device", "cpu", "--out", "X", "--segments", "3"], "invalid --segments = 3"),
    (["evdit", "--preset", "tiny", "--device", "cpu", "--out", "X", "--stages", "kd,foo"], "invalid stages"),
    (["sta", "--preset", "tiny", "--device", "tpu", "--out", "X"], "invalid --device = 'tpu'"),
    (["sta", "--preset", "tiny", "--device", "cpu", "--out", "X", "--sequence-parallel", "2"],
     "invalid --sequence-parallel = 2: expected a divisor of the number of processes, 1"),
    (["sta", "--preset", "tiny", "--device", "cpu", "--out", "X", "--parallel", "zero"], "invalid choice: 'zero'"),
    (["sta", "--preset", "tiny", "--device", "cuda", "--out", "X", "--dtype", "float64"],
     "invalid --dtype = float64 with --device cuda: float64 runs on the CPU only"),
    (["sta", "--preset", "tiny", "--device", "cpu", "--out", "X", "--dtype", "half"], "invalid choice: 'half'"),
    (["evdit", "--preset", "tiny", "--device", "cpu", "--out", "X", "--distill-lr", "0"],
     "invalid --distill-lr = 0.0: expected a number > 0"),
    (["evdit", "--preset", "tiny", "--device", "cpu", "--out", "X", "--stages", "kd", "--steps", "2"],
     "kd needs the attention tile pattern"),
])
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
    args = [str(tmp_path / "out") if a == "X" else a for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tilewise: error: ") and message in err[0], err


def test_console_entry_dispatches_train(tmp_path):
    """`tilewise train ...` goes to tilewise.train.cli (not the C++ binary)."""
    r = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['tilewise', 'train', 'sta', '--preset', "
                        "'tiny', '--device', 'cpu', '--out', sys.argv[1], '--lora', '-1']; "
                        "from tilewise._cli import main; main()", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "tilewise: error: invalid --lora = -1: expected a rank >= 0 " \
        "(0: full fine-tuning)"


@hopper
def test_tiny_sta_cuda_bf16(tmp_path):
    # The tiny preset with head dim 64, the Hopper kernels' smallest: at its own 16 every attention call would fall
    # back to the original attention, which the recipe refuses (no call of the student on tilewise).
    tiny = PRESETS["tiny"]
    preset = tiny.replace(model={**tiny.model, "attention_head_dim": 64}, window=(1, 1, 1), calibrate=None,
                          eval_samples=0)
    s = train_sta(Run(tmp_path / "sta", "cuda", preset, progress=False))["stages"]["sta"]
    assert s["steps"] == preset.sta_steps and s["last_loss"] < s["first_loss"]
