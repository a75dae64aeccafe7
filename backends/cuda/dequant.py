"""GPU dequantization of GGUF blocks: (n_rows, row_bytes) uint8 -> (n_rows, n_cols) bf16/fp16.

One fused Triton kernel per block format reads each block once and writes each weight once:
a program takes NB consecutive blocks (rows are whole numbers of blocks, so a tensor is one flat
run of blocks) as an [NB, QK] tile, gathers each weight's bits from its block, scales it in fp32
and stores it. fp16 scale fields are loaded through an fp16 view of the same buffer (every block
size is even, so every field is 2-byte aligned).

Without Triton (the CPU, or a GPU without it) `dequantize` falls back to plain torch ops that
compute the same fp32 values. Oracle: gguf.quants.dequantize, which computes in fp32 too; the
result equals the oracle rounded to the output dtype, up to one output ulp where fp32 FMA
contraction changes the last fp32 bit before rounding (tests/test_cuda_kernels.py).
"""
from __future__ import annotations

import os

import torch

from ...core.qtypes import QTYPE_INFO, QType
from .fast_launch import launcher  # (no Triton argument binding per launch: hundreds per streamed prompt)

try:  # Triton is optional: the CPU build of torch has none
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAVE_TRITON = False

QUANT_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K)
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
SUPPORTED = frozenset(QUANT_TYPES + FLOAT_TYPES)


def triton_usable(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (used by the CPU tests)."""
    if not HAVE_TRITON:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if HAVE_TRITON:

    @triton.jit
    def _k_4bit_32(x_ptr, h_ptr, out_ptr, n_blocks,
                   TS: tl.constexpr, HAS_MIN: tl.constexpr, HAS_QH: tl.constexpr, NB: tl.constexpr):
        """Q4_0 / Q4_1 / Q5_0 / Q5_1: 32 weights per block, fp16 d (and m), optional 32 high bits."""
        pid = tl.program_id(0)
        b = pid.to(tl.int64) * NB + tl.arange(0, NB)[:, None]  # [NB, 1] block index
        j = tl.arange(0, 32)[None, :]  # [1, 32] weight in block
        bm = b < n_blocks
        base = b * TS
        d = tl.load(h_ptr + b * (TS // 2), mask=bm, other=0.0).to(tl.float32)
        QS_OFF: tl.constexpr = 2 + 2 * HAS_MIN + 4 * HAS_QH
        byte = tl.load(x_ptr + base + QS_OFF + (j % 16), mask=bm, other=0).to(tl.int32)
        q = (byte >> ((j // 16) * 4)) & 15
        if HAS_QH:
            hb = tl.load(x_ptr + base + 2 + 2 * HAS_MIN + j // 8, mask=bm, other=0).to(tl.int32)
            q = q | (((hb >> (j % 8)) & 1) << 4)
        if HAS_MIN:
            m = tl.load(h_ptr + b * (TS // 2) + 1, mask=bm, other=0.0).to(tl.float32)
            w = d * q.to(tl.float32) + m
        else:
            OFFS: tl.constexpr = 8 + 8 * HAS_QH
            w = d * (q - OFFS).to(tl.float32)
        tl.store(out_ptr + b * 32 + j, w.to(out_ptr.dtype.element_ty), mask=bm)

    @triton.jit
    def _k_q8_0(x_ptr, h_ptr, out_ptr, n_blocks, NB: tl.constexpr):
        pid = tl.program_id(0)
        b = pid.to(tl.int64) * NB + tl.arange(0, NB)[:, None]
        j = tl.arange(0, 32)[None, :]
        bm = b < n_blocks
        d = tl.load(h_ptr + b * 17, mask=bm, other=0.0).to(tl.float32)
        q = tl.load(x_ptr + b * 34 + 2 + j, mask=bm, other=0).to(tl.int8, bitcast=True)
        tl.store(out_ptr + b * 32 + j, (d * q.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=bm)

    @triton.jit
    def _k_q45_k(x_ptr, h_ptr, out_ptr, n_blocks, TS: tl.constexpr, HAS_QH: tl.constexpr, NB: tl.constexpr):
        """Q4_K / Q5_K: 256 weights, fp16 d and dmin, 8 sub-blocks with 6-bit scales and mins."""
        pid = tl.program_id(0)
        b = pid.to(tl.int64) * NB + tl.arange(0, NB)[:, None]
        j = tl.arange(0, 256)[None, :]
        bm = b < n_blocks
        base = b * TS
        d = tl.load(h_ptr + b * (TS // 2), mask=bm, other=0.0).to(tl.float32)
        dmin = tl.load(h_ptr + b * (TS // 2) + 1, mask=bm, other=0.0).to(tl.float32)
        s = j // 32  # sub-block 0..7
        lo = s < 4
        sa = tl.load(x_ptr + base + 4 + s, mask=bm & lo, other=0).to(tl.int32)  # bytes 0..3
        sb = tl.load(x_ptr + base + 4 + s + 4, mask=bm, other=0).to(tl.int32)  # bytes 4..7 (s<4) / 8..11
        sc_hi = tl.load(x_ptr + base + 4 + (s - 4), mask=bm & (s >= 4), other=0).to(tl.int32)
        sm_hi = tl.load(x_ptr + base + 4 + s, mask=bm & (s >= 4), other=0).to(tl.int32)
        sc = tl.where(lo, sa & 63, (sb & 15) | ((sc_hi >> 6) << 4))
        mn = tl.where(lo, sb & 63, (sb >> 4) | ((sm_hi >> 6) << 4))
        QS_OFF: tl.constexpr = 16 + 32 * HAS_QH
        byte = tl.load(x_ptr + base + QS_OFF + (j // 64) * 32 + (j % 32), mask=bm, other=0).to(tl.int32)
        q = (byte >> (((j // 32) % 2) * 4)) & 15
        if HAS_QH:
            hb = tl.load(x_ptr + base + 16 + (j % 32), mask=bm, other=0).to(tl.int32)
            q = q | (((hb >> s) & 1) << 4)
        w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        tl.store(out_ptr + b * 256 + j, w.to(out_ptr.dtype.element_ty), mask=bm)

    @triton.jit
    def _k_q6_k(x_ptr, h_ptr, out_ptr, n_blocks, NB: tl.constexpr):
        """Q6_K: 256 weights, 4+2 bits each, 16 int8 scales, fp16 d last."""
        pid = tl.program_id(0)
        b = pid.to(tl.int64) * NB + tl.arange(0, NB)[:, None]
        j = tl.arange(0, 256)[None, :]
        bm = b < n_blocks
        base = b * 210
        d = tl.load(h_ptr + b * 105 + 104, mask=bm, other=0.0).to(tl.float32)
        c = j // 128
        ql = tl.load(x_ptr + base + c * 64 + (j % 64), mask=bm, other=0).to(tl.int32)
        ql = (ql >> (((j // 64) % 2) * 4)) & 15
        qh = tl.load(x_ptr + base + 128 + c * 32 + (j % 32), mask=bm, other=0).to(tl.int32)
        qh = (qh >> (((j // 32) % 4) * 2)) & 3
        sc = tl.load(x_ptr + base + 192 + j // 16, mask=bm, other=0).to(tl.int8, bitcast=True)
        q = (ql | (qh << 4)) - 32
        w = (d * sc.to(tl.float32)) * q.to(tl.float32)
        tl.store(out_ptr + b * 256 + j, w.to(out_ptr.dtype.element_ty), mask=bm)


# per type: weights per program (NB blocks), kernel launcher
_NB = {QType.Q4_0: 128, QType.Q4_1: 128, QType.Q5_0: 128, QType.Q5_1: 128, QType.Q8_0: 128,
       QType.Q4_K: 16, QType.Q5_K: 16, QType.Q6_K: 16}


def _launch(qt: QType, flat: torch.Tensor, h: torch.Tensor, out: torch.Tensor, n_blocks: int) -> None:
    nb = _NB[qt]
    grid = (triton.cdiv(n_blocks, nb),)
    if qt in (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1):
        ts = QTYPE_INFO[qt].type_size
        launcher(_k_4bit_32)(grid, flat, h, out, n_blocks, TS=ts, HAS_MIN=int(qt in (QType.Q4_1, QType.Q5_1)),
                      HAS_QH=int(qt in (QType.Q5_0, QType.Q5_1)), NB=nb, num_warps=4)
    elif qt == QType.Q8_0:
        launcher(_k_q8_0)(grid, flat, h, out, n_blocks, NB=nb, num_warps=4)
    elif qt in (QType.Q4_K, QType.Q5_K):
        launcher(_k_q45_k)(grid, flat, h, out, n_blocks, TS=QTYPE_INFO[qt].type_size, HAS_QH=int(qt == QType.Q5_K),
                       NB=nb, num_warps=4)
    elif qt == QType.Q6_K:
        launcher(_k_q6_k)(grid, flat, h, out, n_blocks, NB=nb, num_warps=4)
    else:  # pragma: no cover
        raise ValueError(f"no Triton kernel for {qt.name}")


def dequantize(blocks: torch.Tensor, qtype: QType, n_cols: int, dtype: torch.dtype = torch.bfloat16,
               out: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """GGUF data -> (n_rows, n_cols) `dtype`.

    blocks: uint8 (n_rows, row_bytes) or flat, contiguous; for float types also the float tensor
    itself. out: optional preallocated (n_rows, n_cols) buffer (a reused scratch for streaming).
    """
    qtype = QType(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"GPU dequantization supports {sorted(t.name for t in SUPPORTED)}, found {qtype.name}")
    if qtype in FLOAT_TYPES:
        src = blocks
        if src.dtype == torch.uint8:
            src = src.reshape(-1).view({QType.F32: torch.float32, QType.F16: torch.float16,
                                        QType.BF16: torch.bfloat16}[qtype])
        elif qtype == QType.BF16 and src.dtype in (torch.int16, torch.uint16):
            src = src.view(torch.bfloat16)
        src = src.reshape(-1, n_cols)
        if out is None:
            return src.to(dtype)
        out.copy_(src)
        return out
    info = QTYPE_INFO[qtype]
    if n_cols % info.block_size:
        raise ValueError(f"{qtype.name} rows need a multiple of {info.block_size} values, found {n_cols}")
    flat = blocks.reshape(-1)
    if flat.dtype != torch.uint8:
        raise ValueError(f"{qtype.name} data must be uint8 blocks, found {flat.dtype}")
    if flat.numel() % info.type_size:
        raise ValueError(f"{qtype.name} data is {flat.numel()} bytes, not a multiple of {info.type_size}")
    n_blocks = flat.numel() // info.type_size
    n_rows = n_blocks * info.block_size // n_cols
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=dtype, device=flat.device)
    elif out.shape != (n_rows, n_cols) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(n_rows, n_cols)} tensor, found {tuple(out.shape)}")
    if n_blocks == 0:
        return out
    if use_triton is None:
        use_triton = triton_usable(flat)
    if use_triton:
        flat = flat.contiguous()
        _launch(qtype, flat, flat.view(torch.float16), out, n_blocks)
        return out
    out.copy_(dequantize_torch(flat.view(n_blocks, info.type_size), qtype).view(n_rows, n_cols))
    return out


# ---------------------------------------------------------------------------------------------------
# torch fallback: the same fp32 arithmetic as gguf.quants, block-major (n_blocks, block_size)


def _f16(blocks: torch.Tensor, off: int) -> torch.Tensor:
    return blocks[:, off:off + 2].contiguous().view(torch.float16).to(torch.float32)  # (n, 1)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k) 4-bit values, ordered as ggml does: per `group` bytes, lows then highs."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group).to(torch.int32)
    return (torch.cat([q & 15, q >> 4], dim=2)).reshape(n, -1)


def dequantize_torch(blocks: torch.Tensor, qtype: QType) -> torch.Tensor:
    """(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32."""
    n = blocks.shape[0]
    qt = QType(qtype)
    if qt == QType.Q4_0:
        return _f16(blocks, 0) * (_nibbles(blocks[:, 2:], 16) - 8).float()
    if qt == QType.Q4_1:
        return _f16(blocks, 0) * _nibbles(blocks[:, 4:], 16).float() + _f16(blocks, 2)
    if qt in (QType.Q5_0, QType.Q5_1):
        off = 2 if qt == QType.Q5_0 else 4
        qh = blocks[:, off:off + 4].to(torch.int32)
        bits = torch.arange(8, dtype=torch.int32, device=blocks.device)
        hb = ((qh[:, :, None] >> bits) & 1).reshape(n, 32)
        q = _nibbles(blocks[:, off + 4:], 16) | (hb << 4)
        if qt == QType.Q5_0:
            return _f16(blocks, 0) * (q - 16).float()
        return _f16(blocks, 0) * q.float() + _f16(blocks, 2)
    if qt == QType.Q8_0:
        return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()
    if qt in (QType.Q4_K, QType.Q5_K):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sb = blocks[:, 4:16].to(torch.int32).reshape(n, 3, 4)
        a, m, md = sb[:, 0], sb[:, 1], sb[:, 2]
        sc = torch.cat([a & 63, (md & 15) | ((a >> 2) & 48)], dim=1).float()  # (n, 8)
        mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1).float()
        qs_off = 16 if qt == QType.Q4_K else 48
        q = _nibbles(blocks[:, qs_off:qs_off + 128], 32).reshape(n, 8, 32)
        if qt == QType.Q5_K:
            qh = blocks[:, 16:48].to(torch.int32)
            bits = torch.arange(8, dtype=torch.int32, device=blocks.device)
            q = q | (((qh[:, None, :] >> bits[None, :, None]) & 1) << 4)
        w = (d * sc)[:, :, None] * q.float() - (dmin * mn)[:, :, None]
        return w.reshape(n, 256)
    if qt == QType.Q6_K:
        ql = _nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
        qh = blocks[:, 128:192].to(torch.int32).reshape(n, 2, 1, 32)
        sh = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=blocks.device).reshape(1, 1, 4, 1)
        qh = ((qh >> sh) & 3).reshape(n, 8, 32)
        q = ((ql | (qh << 4)) - 32).float().reshape(n, 16, 16)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
        d = _f16(blocks, 208)
        return ((d * sc)[:, :, None] * q).reshape(n, 256)
    raise ValueError(f"no dequantization for {qt.name}")


# ---------------------------------------------------------------------------------------------------
# small fused ops: one launch instead of 6-15 torch ops each (the host launches every op of every
# layer, and at -ub 512 its launch time is what bounds a streamed prefill)
