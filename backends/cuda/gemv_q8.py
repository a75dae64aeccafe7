"""Decode GEMV on repacked 32-weight blocks (repack.py) with int8 activations and dp4a.

Reading a 4-bit weight costs a shift, a mask and an FMA in float: ~3 instructions per weight, so
a float GEMV on an H200 is ALU-bound near 2 TB/s (tools/gpu_notes.md). As llama.cpp's MMVQ does,
each program quantizes its x blocks to int8 (one scale per 32 values: |x|max / 127) and multiplies
four quants per dp4a, the nibbles unpacked four at a time with one mask: under one instruction
per weight. The quants load as 16-byte vectors from the repacked rows.

  y[n] = sum_b d[n,b] * dx[b] * (sum_j q[n,b,j] qx[b,j] - OFF * sum_j qx[b,j])  (+ m[n,b] sx[b])

with OFF 8 (Q4_0), 16 (Q5_0), 0 (Q4_1, Q5_1: + m * sum x; Q8_0: signed quants).
On a GPU with Gluon the kernel of gemv_q8_gluon.py computes this (the Triton kernel here let the
compiler shuffle x through shared memory: 827 GB/s on an H200); the Triton kernel runs where Gluon
is missing and, without a GPU, in the Triton interpreter with dp4a emulated (the CPU tests).
"""
from __future__ import annotations

import os

import torch

from ...core.batch import SMALL_BATCH
from ...core.qtypes import QType
from .dequant import HAVE_TRITON, tl, triton
from .fast_launch import launcher
from . import gemv_q8_gluon
from .gemv import pow2_divisor
from .repack import Packed

# type -> (bits 4 or 8, OFF, has min, has fifth bits)
_KIND = {QType.Q4_0: (4, 8, 0, 0), QType.Q4_1: (4, 0, 1, 0), QType.Q5_0: (4, 16, 0, 1),
         QType.Q5_1: (4, 0, 1, 1), QType.Q8_0: (8, 0, 0, 0)}

if HAVE_TRITON:

    @triton.jit
    def _dp4a(a, b, c, ASM: tl.constexpr):
        """c + sum of the four signed byte products of a and b (int32 each)."""
        if ASM:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        s = c
        for k in tl.static_range(4):
            s += ((a << (24 - 8 * k)) >> 24) * ((b << (24 - 8 * k)) >> 24)
        return s

    @triton.jit
    def _spread(h):
        """4 bits (bits 0-3 of h) to bit 4 of each byte: the fifth bits of four 5-bit quants."""
        return ((h & 1) << 4) | ((h & 2) << 11) | ((h & 4) << 18) | ((h & 8) << 25)

    @triton.jit
    def _pack4(q, BP: tl.constexpr, KB: tl.constexpr):
        """[BP, KB, 32] int32 values in -127..127 -> [BP, KB, 8] words of four int8 (little endian)."""
        a, b = tl.split(tl.reshape(q & 0xFF, (BP, KB, 16, 2)))
        h = a | (b << 8)
        lo, hi = tl.split(tl.reshape(h, (BP, KB, 8, 2)))
        return lo | (hi << 16)

    @triton.jit
    def _step(x_ptr, qs_ptr, d_ptr, m_ptr, qh_ptr, k0, rows, bat, bm, NB,
              BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr, HAS_QH: tl.constexpr,
              BP: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, ASM: tl.constexpr):
        """Blocks [k0, k0 + KB) of rows `rows`: their [BP, BN] contribution to y."""
        WPB: tl.constexpr = BITS  # int32 words of quants per block: 4 (4-bit) or 8 (8-bit)
        blk = k0 + tl.arange(0, KB)
        # x: [BP, KB, 32] -> int8 per block, its scale dx and the sum of its quants
        xo = (bat.to(tl.int64)[:, None, None] * NB + blk[None, :, None]) * 32 + tl.arange(0, 32)[None, None, :]
        x = tl.load(x_ptr + xo, mask=bm[:, None, None], other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=2)
        dx = amax / 127.0
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        qx = (x * inv[:, :, None] + tl.where(x >= 0, 0.5, -0.5)).to(tl.int32)  # round half away
        sq = tl.sum(qx, axis=2)  # [BP, KB]
        xw = _pack4(qx, BP, KB)  # [BP, KB, 8] words: x 0-15 in words 0-3, 16-31 in 4-7
        wo = (rows[:, None, None] * NB + blk[None, :, None]) * WPB + tl.arange(0, WPB)[None, None, :]
        qw = tl.load(qs_ptr + wo)  # [BN, KB, WPB] int32: 16-byte vectors
        if BITS == 8:
            shp: tl.constexpr = [BP, BN, KB, 8]
            dot = tl.sum(_dp4a(tl.broadcast_to(qw[None, :, :, :], shp), tl.broadcast_to(xw[:, None, :, :], shp),
                               tl.zeros(shp, tl.int32), ASM), axis=3)
        else:
            lo = qw & 0x0F0F0F0F  # quants 4i..4i+3 of word i
            hi = (qw >> 4) & 0x0F0F0F0F  # quants 16+4i..16+4i+3
            if HAS_QH:
                qh = tl.load(qh_ptr + rows[:, None] * NB + blk[None, :])  # [BN, KB]
                i4 = tl.arange(0, 4)[None, None, :] * 4
                lo = lo | _spread((qh[:, :, None] >> i4) & 15)
                hi = hi | _spread((qh[:, :, None] >> (i4 + 16)) & 15)
            xl, xh = tl.split(tl.permute(tl.reshape(xw, (BP, KB, 2, 4)), (0, 1, 3, 2)))
            sh4: tl.constexpr = [BP, BN, KB, 4]
            t = _dp4a(tl.broadcast_to(lo[None, :, :, :], sh4), tl.broadcast_to(xl[:, None, :, :], sh4),
                      tl.zeros(sh4, tl.int32), ASM)
            t = _dp4a(tl.broadcast_to(hi[None, :, :, :], sh4), tl.broadcast_to(xh[:, None, :, :], sh4), t, ASM)
            dot = tl.sum(t, axis=3)
        d = tl.load(d_ptr + rows[:, None] * NB + blk[None, :]).to(tl.float32)  # [BN, KB]
        v = dot.to(tl.float32) - OFF * sq[:, None, :].to(tl.float32)
        part = d[None, :, :] * (dx[:, None, :] * v)
        if HAS_MIN:
            m = tl.load(m_ptr + rows[:, None] * NB + blk[None, :]).to(tl.float32)
            part += m[None, :, :] * (dx * sq.to(tl.float32))[:, None, :]
        return tl.sum(part, axis=2)

    @triton.jit
    def _k_gemv(x_ptr, qs_ptr, d_ptr, m_ptr, qh_ptr, out_ptr, B, N, NB,
                BITS: tl.constexpr, OFF: tl.constexpr, HAS_MIN: tl.constexpr, HAS_QH: tl.constexpr,
                BP: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, ASM: tl.constexpr):
        """Program: rows [pid*BN, pid*BN + BN) of y (all batch rows), KB blocks per step. On a GPU
        a for loop (Triton pipelines its loads); in the interpreter a while loop (runtime bounds)."""
        pid = tl.program_id(0)
        rows = tl.minimum(pid * BN + tl.arange(0, BN), N - 1).to(tl.int64)  # clamped: no load masks
        bat = tl.arange(0, BP)
        bm = bat < B
        acc = tl.zeros([BP, BN], tl.float32)
        if ASM:
            for k0 in range(0, NB, KB):
                acc += _step(x_ptr, qs_ptr, d_ptr, m_ptr, qh_ptr, k0, rows, bat, bm, NB,
                             BITS, OFF, HAS_MIN, HAS_QH, BP, BN, KB, ASM)
        else:
            k0 = 0
            while k0 < NB:
                acc += _step(x_ptr, qs_ptr, d_ptr, m_ptr, qh_ptr, k0, rows, bat, bm, NB,
                             BITS, OFF, HAS_MIN, HAS_QH, BP, BN, KB, ASM)
                k0 += KB
        orow = pid * BN + tl.arange(0, BN)
        tl.store(out_ptr + bat[:, None] * N + orow[None, :], acc, mask=bm[:, None] & (orow[None, :] < N))



def config(p: Packed, batch: int) -> tuple[int, int, int]:
    """(BN rows per program, KB blocks per step, num_warps), from the shape only (graph safe)."""
    nb = p.n_cols // 32
    kb = pow2_divisor(nb, 8)
    bn = 16 if batch <= 2 else 8
    while bn > 2 and p.n_rows // bn < 264:  # >= 2 programs per SM of an H200
        bn //= 2
    return bn, kb, 4


def gemv_glu(x: torch.Tensor, p: Packed, n_ffn: int, dtype: torch.dtype) -> torch.Tensor | None:
    """silu(x @ gate^T) * (x @ up^T) in `dtype`, p = gate|up stacked (2 * n_ffn rows), by one launch
    of the Gluon GEMV per SMALL_BATCH rows (the activation in its epilogue); None without Gluon."""
    if not (x.is_cuda and gemv_q8_gluon.HAVE_GLUON) or p.qtype not in _KIND or p.n_rows != 2 * n_ffn \
            or x.shape[1] != p.n_cols:
        return None
    x = x.contiguous()
    out = torch.empty((x.shape[0], n_ffn), dtype=dtype, device=x.device)
    for s in range(0, x.shape[0], SMALL_BATCH):
        gemv_q8_gluon.launch(x[s:s + SMALL_BATCH], p, out[s:s + SMALL_BATCH], _KIND[p.qtype], glu=n_ffn)
    return out


def gemv(x: torch.Tensor, p: Packed, out: torch.Tensor | None = None, cfg=None) -> torch.Tensor:
    """y = x @ W^T in fp32: x (B, n_cols) fp32/bf16/fp16 with B <= SMALL_BATCH per launch."""
    bsz, k = x.shape
    if k != p.n_cols or p.qtype not in _KIND:
        raise ValueError(f"gemv_q8: x must be (B, {p.n_cols}) and the weight one of {sorted(t.name for t in _KIND)}, "
                         f"found {tuple(x.shape)} and {p.qtype.name}")
    if out is None:
        out = torch.empty((bsz, p.n_rows), dtype=torch.float32, device=x.device)
    if not (HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")):
        return torch.matmul(x.float(), _dequantize_torch(p).t(), out=out)
    x = x.contiguous()
    if x.is_cuda and gemv_q8_gluon.HAVE_GLUON:  # the GPU kernel: whole blocks per thread (see there)
        for s in range(0, bsz, SMALL_BATCH):
            gemv_q8_gluon.launch(x[s:s + SMALL_BATCH], p, out[s:s + SMALL_BATCH], _KIND[p.qtype], cfg)
        return out
    bits, off, has_min, has_qh = _KIND[p.qtype]
    bn, kb, nw = cfg or config(p, bsz)
    dummy = p.d
    for s in range(0, bsz, SMALL_BATCH):  # shapes only: the same launches every call
        xs, o = x[s:s + SMALL_BATCH], out[s:s + SMALL_BATCH]
        _k_gemv[(triton.cdiv(p.n_rows, bn),)](
            xs, p.qs, p.d, p.m if p.m is not None else dummy, p.qh if p.qh is not None else dummy, o,
            xs.shape[0], p.n_rows, k // 32, BITS=bits, OFF=off, HAS_MIN=has_min, HAS_QH=has_qh,
            BP=max(1, triton.next_power_of_2(xs.shape[0])), BN=bn, KB=kb, ASM=x.is_cuda, num_warps=nw)
    return out


if HAVE_TRITON:

    @triton.jit
    def _k_deq(qs_ptr, d_ptr, m_ptr, qh_ptr, out_ptr, n_blocks, BITS: tl.constexpr, OFF: tl.constexpr,
               HAS_MIN: tl.constexpr, HAS_QH: tl.constexpr, NBP: tl.constexpr):
        """NBP blocks per program (blocks are row-major: block b is row b // NB, weights b*32..)."""
        b = tl.program_id(0).to(tl.int64) * NBP + tl.arange(0, NBP)[:, None]  # [NBP, 1]
        bmask = b < n_blocks
        j = tl.arange(0, 32)[None, :]  # weight in block
        if BITS == 8:
            word = tl.load(qs_ptr + b * 8 + j // 4, mask=bmask, other=0)
            q = (word << (24 - 8 * (j % 4))) >> 24
        else:
            word = tl.load(qs_ptr + b * 4 + (j % 16) // 4, mask=bmask, other=0)
            q = (word >> (8 * (j % 4) + 4 * (j // 16))) & 15
            if HAS_QH:
                q = q | (((tl.load(qh_ptr + b, mask=bmask, other=0) >> j) & 1) << 4)
        w = tl.load(d_ptr + b, mask=bmask, other=0.0).to(tl.float32) * (q - OFF).to(tl.float32)
        if HAS_MIN:
            w += tl.load(m_ptr + b, mask=bmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * 32 + j, w.to(out_ptr.dtype.element_ty), mask=bmask)

def dequantize(p: Packed, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as (n_rows, n_cols) floats (prefill's matmuls): a Triton kernel on the device,
    torch otherwise; both exactly d * (q - OFF) (+ m) in fp32, then rounded to `dtype`."""
    nb = p.n_cols // 32
    bits, off, has_min, has_qh = _KIND[p.qtype]
    if out is None:
        out = torch.empty((p.n_rows, p.n_cols), dtype=dtype, device=p.qs.device)
    if HAVE_TRITON and (p.qs.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        n_blocks = p.n_rows * nb
        launcher(_k_deq)((triton.cdiv(n_blocks, 64),), p.qs, p.d, p.m if p.m is not None else p.d,
                  p.qh if p.qh is not None else p.d, out, n_blocks, BITS=bits, OFF=off,
                  HAS_MIN=has_min, HAS_QH=has_qh, NBP=64, num_warps=4)
        return out
    out.copy_(_dequantize_torch(p).to(dtype))
    return out


def _dequantize_torch(p: Packed) -> torch.Tensor:
    nb = p.n_cols // 32
    bits, off, has_min, has_qh = _KIND[p.qtype]
    by = p.qs.view(torch.uint8).reshape(p.n_rows, nb, -1).to(torch.int32)
    if bits == 8:
        q = (by ^ 128) - 128  # bytes as signed int8
    else:
        q = torch.cat([by & 15, by >> 4], dim=2)  # weight j < 16: low nibble of byte j; j >= 16: high
        if has_qh:
            q = q | (((p.qh[:, :, None] >> torch.arange(32, device=q.device)) & 1) << 4)
    w = p.d.float()[:, :, None] * (q - off).float()
    if has_min:
        w = w + p.m.float()[:, :, None]
    return w.reshape(p.n_rows, p.n_cols)
