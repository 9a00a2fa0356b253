"""Training data: a folder of precomputed latents and text embeddings, and a synthetic source.

Folder format (docs/training.md): one safetensors file per sample, `DIR/*.safetensors`, read in name order, with
  - `latents`   [C, F, H, W] float: the VAE latent of the video (already scaled as the transformer expects);
  - `text`      [L, D] float: the text encoder's hidden states (padded to the same L in every file);
  - `text_mask` [L] integer or bool, optional: 1 for real tokens (HunyuanVideo's attention mask);
  - `pooled`    [P] float, optional: the pooled text embedding (HunyuanVideo's CLIP projection).
Every file holds the same tensor names and shapes. write_sample() writes one; export() writes a data set.

The synthetic source (MovingShapes) writes videos directly as latents: a few Gaussian blobs, each with its own
channel signature, start and velocity, so that frames are related by motion; its text embedding is a fixed
random projection of those parameters, one token per blob, so the conditioning says what moves where."""
from __future__ import annotations

import math
from pathlib import Path

import torch

KEYS = ("latents", "text", "text_mask", "pooled")


class LatentFolder(torch.utils.data.Dataset):
    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"invalid data = {str(directory)!r}: expected a folder of .safetensors samples")
        self.files = sorted(self.directory.glob("*.safetensors"))
        if not self.files:
            raise ValueError(f"invalid data = {str(directory)!r}: no .safetensors file in it (see docs/training.md)")
        first = self[0]
        for key in ("latents", "text"):
            if key not in first:
                raise ValueError(f"invalid data file {self.files[0]}: expected a tensor named {key!r}, found "
                                 f"{sorted(first)}")
        if first["latents"].ndim != 4 or first["text"].ndim != 2:
            raise ValueError(f"invalid data file {self.files[0]}: expected latents [C, F, H, W] and text [L, D], "
                             f"got {list(first['latents'].shape)} and {list(first['text'].shape)}")
        self.shapes = {k: tuple(v.shape) for k, v in first.items()}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from safetensors.torch import load_file

        sample = load_file(str(self.files[i]))
        unknown = set(sample) - set(KEYS)
        if unknown:
            raise ValueError(f"invalid data file {self.files[i]}: unknown tensors {sorted(unknown)}; expected "
                             f"{', '.join(KEYS)}")
        if i and {k: tuple(v.shape) for k, v in sample.items()} != self.shapes:
            raise ValueError(f"invalid data file {self.files[i]}: tensors {({k: list(v.shape) for k, v in sample.items()})}"
                             f" differ from {self.files[0].name}'s {self.shapes}")
        return {k: (v.float() if k != "text_mask" else v.long()) for k, v in sample.items()}


class MovingShapes(torch.utils.data.Dataset):
    """`count` deterministic samples (sample i depends only on seed and i): latents [C, F, H, W] and text [L, D].

    L blobs per video (one text token each). A blob's latent is its channel signature times a Gaussian bump
    that moves linearly over the frames; the text token is a fixed projection of (signature, start, velocity)."""

    def __init__(self, count: int, latent: tuple, text_len: int, text_dim: int, seed: int = 0):
        self.count, self.latent, self.text_len, self.text_dim, self.seed = int(count), tuple(latent), \
            int(text_len), int(text_dim), int(seed)
        if self.count < 1:
            raise ValueError(f"invalid samples = {count}: expected at least 1")
        C = self.latent[0]
        g = torch.Generator().manual_seed(self.seed + 7919)  # the projection is the "text encoder": fixed per set
        self.projection = torch.randn(C + 4, self.text_dim, generator=g) / math.sqrt(C + 4)

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        C, F, H, W = self.latent
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        sig = torch.randn(self.text_len, C, generator=g)
        start = torch.rand(self.text_len, 2, generator=g)                  # in [0, 1): (y, x)
        vel = (torch.rand(self.text_len, 2, generator=g) - 0.5) * 0.5     # up to a quarter frame per frame
        radius = 0.12
        t = torch.arange(F).float()[:, None, None]
        ys = (torch.arange(H).float() + 0.5) / H
        xs = (torch.arange(W).float() + 0.5) / W
        latents = torch.zeros(C, F, H, W)
        for b in range(self.text_len):
            cy = (start[b, 0] + vel[b, 0] * t) % 1.0
            cx = (start[b, 1] + vel[b, 1] * t) % 1.0
            bump = torch.exp(-((ys[None, :, None] - cy) ** 2 + (xs[None, None, :] - cx) ** 2) / (2 * radius ** 2))
            latents += sig[b][:, None, None, None] * bump[None]
        text = torch.cat([sig, start, vel], dim=1) @ self.projection
        return {"latents": latents, "text": text}


def write_sample(path, *, latents, text, text_mask=None, pooled=None) -> None:
    """Writes one sample in the folder format (tensors are copied to the CPU, contiguous)."""
    from safetensors.torch import save_file

    tensors = {"latents": latents, "text": text, "text_mask": text_mask, "pooled": pooled}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}, str(path))


def export(dataset, directory) -> list:
    """Writes every sample of a data set (e.g. MovingShapes) as DIR/000000.safetensors, ...; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(dataset)):
        paths.append(directory / f"{i:06d}.safetensors")
        write_sample(paths[-1], **dataset[i])
    return paths


def batches(dataset, batch: int, seed: int, rank: int = 0, world: int = 1, skip: int = 0):
    """An endless iterator of collated batches: global batches of world x `batch` samples in a fresh permutation
    per epoch (from seed and epoch), rank r of `world` taking samples [r * batch, (r + 1) * batch) of each, so that
    the ranks together see what one process with batch world x `batch` sees. skip: batches to pass over without
    loading them (a resumed run continues with the data it would have seen)."""
    epoch = 0
    n = len(dataset)
    whole = batch * world
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7 + epoch)).tolist()
        for j in range(max(1, n // whole)):
            if skip > 0:
                skip -= 1
                continue
            samples = [dataset[order[(j * whole + rank * batch + k) % n]] for k in range(batch)]
            yield {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        epoch += 1
