"""A tiny array shim so that the error reduction runs on numpy arrays and on torch tensors alike.

Only what the search needs: a [B, S, H, D] view of either layout, and per-head sums of squared and absolute
differences (and of squares) reduced chunk by chunk along S, so that no temporary larger than one chunk is ever
materialised. Sums are accumulated in float64 across chunks (float32 inside a chunk).
"""
from __future__ import annotations

import numpy as np

# Elements per chunk of the reduction (of one [B, s, H, D] slice): 4 MiB of float32 temporaries on the host,
# 128 MiB on a GPU (a 720p HunyuanVideo output, 115456 x 24 x 128, is 11 chunks).
CHUNK_ELEMENTS = 1 << 20
CUDA_CHUNK_ELEMENTS = 1 << 25


def is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def to_host_numpy(x):
    """A numpy array for x: numpy arrays pass through, CPU torch tensors are viewed without a copy where
    numpy has the dtype (bfloat16 becomes float32)."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        import torch

        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    raise TypeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")


def prepare(q, k, v):
    """The arrays the search runs on and the ops that reduce them: CUDA torch tensors stay on the device
    (they run on the Hopper kernel); numpy arrays and CPU torch tensors run on the CPU backend."""
    if all(is_torch(x) for x in (q, k, v)) and q.device.type != "cpu":
        return (q, k, v), TorchOps()
    return tuple(to_host_numpy(x) for x in (q, k, v)), NumpyOps()


def _rows_per_chunk(shape) -> int:
    b, _, h, d = shape
    return max(1, CHUNK_ELEMENTS // max(1, b * h * d))


class NumpyOps:
    name = "numpy"

    @staticmethod
    def bshd(x, layout: str):
        return x if layout == "bshd" else x.transpose(0, 2, 1, 3)

    @staticmethod
    def _f(x):
        return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)

    def diff_sums(self, o, ref, layout: str):
        """Per head: (sum of (o - ref)^2, sum of |o - ref|) over (B, S, D), as float64 arrays [H]."""
        o, ref = self.bshd(o, layout), self.bshd(ref, layout)
        H = o.shape[2]
        sq, ab = np.zeros(H), np.zeros(H)
        step = _rows_per_chunk(o.shape)
        for s in range(0, o.shape[1], step):
            d = self._f(o[:, s:s + step]) - self._f(ref[:, s:s + step])
            sq += np.einsum("bshd,bshd->h", d, d)
            np.abs(d, out=d)
            ab += d.sum(axis=(0, 1, 3))
        return sq, ab

    def square_sums(self, x, layout: str):
        x = self.bshd(x, layout)
        out = np.zeros(x.shape[2])
        step = _rows_per_chunk(x.shape)
        for s in range(0, x.shape[1], step):
            c = self._f(x[:, s:s + step])
            out += np.einsum("bshd,bshd->h", c, c)
        return out

    @staticmethod
    def to_numpy(values):
        return np.asarray(values, dtype=np.float64)


class TorchOps:
    """The reduction on torch tensors, on their device. Per chunk: one float32 copy of the candidate's rows, an
    in-place subtraction of the dense rows (cast on the fly) and two norm reductions over (B, s, D), i.e. four
    kernels and no host sync; the per-chunk sums are added up in float64 on the device. CUDA chunks are large
    (CUDA_CHUNK_ELEMENTS), so that a 720p HunyuanVideo output is a handful of chunks, not hundreds of launches."""

    name = "torch"

    @staticmethod
    def bshd(x, layout: str):
        return x if layout == "bshd" else x.transpose(1, 2)

    @staticmethod
    def _rows(x) -> int:
        elements = CUDA_CHUNK_ELEMENTS if x.device.type == "cuda" else CHUNK_ELEMENTS
        b, _, h, d = x.shape
        return max(1, elements // max(1, b * h * d))

    @staticmethod
    def _float(x):
        import torch

        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def diff_sums(self, o, ref, layout: str):
        """Per head: (sum of (o - ref)^2, sum of |o - ref|) over (B, S, D), as float64 tensors [H] on o's
        device."""
        import torch

        o, ref = self.bshd(o, layout), self.bshd(ref, layout)
        dims, dtype, step = (0, 1, 3), self._float(o), self._rows(o)
        sq, ab = [], []
        for s in range(0, o.shape[1], step):
            d = o[:, s:s + step].to(dtype, copy=True)  # a copy even when o is float32: it is modified in place
            d.sub_(ref[:, s:s + step])
            sq.append(torch.linalg.vector_norm(d, 2, dim=dims))
            ab.append(torch.linalg.vector_norm(d, 1, dim=dims))
            del d
        return torch.stack(sq).double().square().sum(0), torch.stack(ab).double().sum(0)

    def square_sums(self, x, layout: str):
        import torch

        x = self.bshd(x, layout)
        dims, dtype, step = (0, 1, 3), self._float(x), self._rows(x)
        parts = [torch.linalg.vector_norm(x[:, s:s + step], 2, dim=dims, dtype=dtype)
                 for s in range(0, x.shape[1], step)]
        return torch.stack(parts).double().square().sum(0)

    @staticmethod
    def to_numpy(values):
        """One device-to-host copy (and sync) for everything a (step, layer) produced."""
        import torch

        if isinstance(values, (list, tuple)):
            values = torch.stack([torch.as_tensor(v) for v in values])
        return values.double().cpu().numpy()
