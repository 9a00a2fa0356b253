"""Training recipes over diffusers video transformers with tilewise attention (docs/training.md).

    tilewise train sta   --preset tiny --device cpu --out runs/sta     # STA fine-tuning
    tilewise train evdit --preset tiny --device cpu --out runs/evdit   # Efficient-vDiT: mlcd, search, kd

From Python:

    from tilewise.train import PRESETS, Run, train_sta, train_evdit
    run = Run("runs/sta", "cpu", PRESETS["tiny"].replace(sta_steps=50))
    summary = train_sta(run)                     # {"stages": {"sta": {"first_loss", "last_loss", "steps"}}}

Modules: data (folder format, synthetic moving shapes), models (presets, family adapters), flow (flow matching,
sampling, consistency function), loop (training loop, atomic checkpoints, resume, summary), sta, evdit, cli.
Needs torch, diffusers, safetensors, tqdm and peft (requirements-torch.txt)."""
from tilewise.train.data import LatentFolder, MovingShapes, export, write_sample  # noqa: F401
from tilewise.train.evdit import STAGES, train_evdit  # noqa: F401
from tilewise.train.loop import Run  # noqa: F401
from tilewise.train.models import PRESETS, Preset  # noqa: F401
from tilewise.train.sta import train_sta  # noqa: F401

__all__ = ["LatentFolder", "MovingShapes", "PRESETS", "Preset", "Run", "STAGES", "export", "train_evdit",
           "train_sta", "write_sample"]
