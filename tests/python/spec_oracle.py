"""Independent oracles written from the spec (docs/semantics.md), shared by the Python tests: dense float64
attention whose mask is evaluated from the spec's formulas, never from the library."""
import numpy as np


def window(c, k, n):
    """Spec: k >= n -> [0, n); else start = clamp(c - k // 2, 0, n - k), tiles [start, start + k)."""
    if k >= n:
        return 0, n
    s = min(max(c - k // 2, 0), n - k)
    return s, s + k


def masks(B, S, Hq, latent, allowed_video, text_len, text_first=False):
    """[B, Hq, S, S] bool, element by element from the spec: may query i see key j (raster order)."""
    T, H, W = latent
    nv = T * H * W
    L = S - nv
    v0, t0 = (L, 0) if text_first else (0, nv)
    coords = [(i // (H * W), (i // W) % H, i % W) for i in range(nv)]
    out = np.zeros((B, Hq, S, S), dtype=bool)
    for b in range(B):
        n_text = L if text_len is None else int(np.broadcast_to(text_len, (B,))[b])
        for h in range(Hq):
            mask = out[b, h]
            for i in range(S):
                qi_text = not (v0 <= i < v0 + nv)
                for j in range(S):
                    kj_text = not (v0 <= j < v0 + nv)
                    if kj_text:
                        mask[i, j] = j - t0 < n_text
                    elif qi_text:
                        mask[i, j] = True
                    else:
                        mask[i, j] = allowed_video(h, coords[i - v0], coords[j - v0])
    return out


def oracle(q, k, v, latent, tile, allowed_video, text_len, text_first=False, scale=None):
    """numpy, element by element. q, k, v: [B, S, H, D] float64; allowed_video(h, (t,h,w) query, (t,h,w) key)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    scale = scale or 1 / np.sqrt(D)
    o = np.zeros_like(q)
    lse = np.zeros((B, Hq, S))
    all_masks = masks(B, S, Hq, latent, allowed_video, text_len, text_first)
    for b in range(B):
        for h in range(Hq):
            mask = all_masks[b, h]
            s = scale * q[b, :, h] @ k[b, :, h // (Hq // Hk)].T
            s[~mask] = -np.inf
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            o[b, :, h] = (p @ v[b, :, h // (Hq // Hk)]) / p.sum(axis=1, keepdims=True)
            lse[b, h] = (m + np.log(p.sum(axis=1, keepdims=True)))[:, 0]
    return o, lse


def sta_mask(latent, tile, windows):
    n = [-(-latent[a] // tile[a]) for a in range(3)]

    def allowed(h, qc, kc):
        win = windows[h] if len(windows) > 1 else windows[0]
        for a in range(3):
            lo, hi = window(qc[a] // tile[a], win[a], n[a])
            if not lo <= kc[a] // tile[a] < hi:
                return False
        return True

    return allowed


# --- torch, vectorised (for the torch op and the CUDA tests, where sequences are longer) ---

def torch_sta_video_mask(latent, tile, win, device="cpu"):
    """[Nv, Nv] bool: video query i may see video key j under STA window `win` (spec formula, per axis)."""
    import torch
    T, H, W = latent
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)  # raster order
    allowed = torch.ones(T * H * W, T * H * W, dtype=torch.bool)
    for a in range(3):
        n = -(-latent[a] // tile[a])
        c = coords[:, a] // tile[a]  # tile coordinate of each token
        lo_hi = torch.tensor([window(int(x), win[a], n) for x in range(n)])
        lo, hi = lo_hi[c, 0], lo_hi[c, 1]
        allowed &= (lo[:, None] <= c[None, :]) & (c[None, :] < hi[:, None])
    return allowed.to(device)


def torch_oracle(q, k, v, latent, video_masks, text_len=None, text_first=False, scale=None):
    """float64 torch oracle. q [B, S, Hq, D], k/v [B, S, Hk, D] (any dtype, any device);
    video_masks: one [Nv, Nv] bool mask per query head (or one for all); text_len: None or B ints.
    Returns o [B, S, Hq, D] and lse [B, Hq, S], float64."""
    import torch
    q, k, v = (x.double() for x in (q, k, v))
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    nv = latent[0] * latent[1] * latent[2]
    L = S - nv
    video = slice(L, S) if text_first else slice(0, nv)
    text_start = 0 if text_first else nv
    scale = scale or D ** -0.5
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, S, dtype=torch.float64, device=q.device)
    pos = torch.arange(S, device=q.device)
    is_text = (pos < L) if text_first else (pos >= nv)
    for b in range(B):
        n_text = L if text_len is None else int(text_len[b])
        key_ok = ~is_text | (pos - text_start < n_text)  # padding text keys are never seen
        for h in range(Hq):
            mask = key_ok[None, :].repeat(S, 1)
            vm = video_masks[h] if len(video_masks) > 1 else video_masks[0]
            mask[video, video] &= vm.to(q.device)
            kv = h // (Hq // Hk)
            s = scale * q[b, :, h] @ k[b, :, kv].T
            s = s.masked_fill(~mask, float("-inf"))
            lse[b, h] = torch.logsumexp(s, dim=1)
            o[b, :, h] = torch.softmax(s, dim=1) @ v[b, :, kv]
    return o, lse
