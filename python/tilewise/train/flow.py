"""Flow matching (rectified flow, as diffusers' FlowMatchEulerDiscreteScheduler): x_sigma = (1 - sigma) x0 +
sigma * noise, velocity target noise - x0, Euler sampling from sigma 1 to 0; and the segment-wise consistency
function of multi-step latent consistency distillation (MLCD)."""
from __future__ import annotations

import torch

from tilewise.train import models


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of SD3 / Wan schedules: more steps at high noise for shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 noise levels from 1 down to 0."""
    return shifted(torch.linspace(1.0, 0.0, steps + 1), shift)


def noised(x0, noise, sigma):
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def flow_matching_target(x0, noise):
    return noise - x0


@torch.no_grad()
def sample(model, noise, batch, sigmas: torch.Tensor, autocast=None):
    """Euler ODE sampling along `sigmas` (descending, from 1 to 0) from pure noise; returns x at sigma 0."""
    x = noise
    B = x.shape[0]
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        with autocast():
            v = models.call(model, x, torch.full((B,), s, device=x.device), batch)
        x = x + (s_next - s) * v.to(x.dtype)
    return x


def segment_sigmas(teacher_steps: int, segments: int, shift: float) -> tuple:
    """(teacher schedule [N + 1], index in it of each segment boundary [segments + 1]): the N teacher steps are
    split into `segments` runs of equal length (N must be a multiple of segments)."""
    if teacher_steps % segments:
        raise ValueError(f"invalid teacher_steps = {teacher_steps}: expected a multiple of segments = {segments}")
    sig = schedule(teacher_steps, shift)
    per = teacher_steps // segments
    return sig, [k * per for k in range(segments + 1)]


def student_sigmas(teacher_steps: int, segments: int, student_steps: int, shift: float) -> torch.Tensor:
    """The few-step student's schedule: every segment boundary of the teacher's schedule, each segment split into
    student_steps / segments equal parts. With one step per segment each step is one consistency jump."""
    if student_steps % segments:
        raise ValueError(f"invalid student_steps = {student_steps}: expected a multiple of segments = {segments}")
    sig, bounds = segment_sigmas(teacher_steps, segments, shift)
    per = student_steps // segments
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        hi, lo = float(sig[a]), float(sig[b])
        out += [hi + (lo - hi) * j / per for j in range(per)]
    return torch.tensor(out + [0.0])


def consistency(v, x, sigma, boundary):
    """The consistency function of a segment: x jumped to the segment's lower boundary along the predicted
    velocity; f(x, boundary) = x by construction (the boundary condition of consistency models)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    return x + (boundary - sigma).view(shape) * v
