"""RMS norm and RoPE on the GPU: Triton kernels (fp32 math, output in the compute dtype), with
plain torch fallbacks where Triton cannot run."""
from __future__ import annotations

import torch

from .dequant import HAVE_TRITON, tl, triton, triton_usable
from .fast_launch import FastLaunch


if HAVE_TRITON:

    @triton.jit
    def _k_rms_norm(x_ptr, w_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        tl.store(out_ptr + row * N + cols, (x * r * w).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _k_rope(x_ptr, cos_ptr, sin_ptr, out_ptr, H, HD: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr,
                HB: tl.constexpr, PB: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * HB + tl.arange(0, HB)[:, None]
        i = tl.arange(0, PB)[None, :]
        im = i < HALF
        m = (h < H) & im
        c = tl.load(cos_ptr + t * HALF + i, mask=im, other=0.0)
        s = tl.load(sin_ptr + t * HALF + i, mask=im, other=0.0)
        base = t * H * HD + h * HD
        if NEOX:
            ia = i
            ib = i + HALF
        else:
            ia = 2 * i
            ib = 2 * i + 1
        a = tl.load(x_ptr + base + ia, mask=m, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + base + ib, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + ia, (a * c - b * s).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(out_ptr + base + ib, (a * s + b * c).to(out_ptr.dtype.element_ty), mask=m)


_fast_rms = FastLaunch(_k_rms_norm) if HAVE_TRITON else None
_fast_rope = FastLaunch(_k_rope) if HAVE_TRITON else None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, dtype: torch.dtype, use_triton: bool | None = None):
    """x (T, N) -> x * rsqrt(mean(x^2) + eps) * w in `dtype`, computed in fp32 (w: fp32)."""
    if use_triton is None:
        use_triton = triton_usable(x)
    if use_triton and x.is_contiguous():
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        n = x.shape[-1]
        _fast_rms((x.numel() // n,), x, w, out, n, eps, BLOCK=triton.next_power_of_2(n),
                  num_warps=8 if n >= 4096 else 4)
        return out
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * w).to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, head_dim: int, n_rot: int,
         neox: bool, dtype: torch.dtype, use_triton: bool | None = None) -> torch.Tensor:
    """x (T, n_head*head_dim); cos/sin (T, n_rot/2) fp32. Rotates adjacent pairs ("norm", GGUF
    llama) or halves ("neox"); dims past n_rot pass through. Returns (T, n_head*head_dim) `dtype`."""
    t = x.shape[0]
    if use_triton is None:
        use_triton = triton_usable(x)
    if use_triton and n_rot == head_dim and x.is_contiguous():
        out = torch.empty((t, n_head * head_dim), dtype=dtype, device=x.device)
        half = n_rot // 2
        hb = 8
        _fast_rope((t, triton.cdiv(n_head, hb)), x, cos, sin, out, n_head, HD=head_dim, HALF=half, NEOX=bool(neox),
                   HB=hb, PB=triton.next_power_of_2(half), num_warps=4)
        return out
    xf = x.float().reshape(t, n_head, head_dim)
    out = xf.clone()
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:
        a, b = xf[..., : n_rot // 2], xf[..., n_rot // 2: n_rot]
        out[..., : n_rot // 2] = a * c - b * s
        out[..., n_rot // 2: n_rot] = a * s + b * c
    else:
        a, b = xf[..., 0:n_rot:2], xf[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * c - b * s
        out[..., 1:n_rot:2] = a * s + b * c
    return out.to(dtype).reshape(t, -1)
