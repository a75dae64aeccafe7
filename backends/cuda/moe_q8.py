"""Decode expert GEMVs on int8 activations (Gluon): gemv_q8_gluon's dot products with an expert axis.

The float expert GEMVs of moe_kernels.py dequantize every weight (~5-7 instructions each) and ran
at ~0.85 TB/s on an H200 (8-layer Qwen3-30B-A3B shape, all experts resident: gate|up 16.6 us and
down 7.5 us of a layer's ~67 us). Here, as in the dense decode GEMV (gemv_q8.py), each program
quantizes its x blocks to int8 and multiplies four quants per dp4a; the expert comes from the
router's ids on the device, so a step stays one graph.

  gate|up: program (row tile, pair p = token * top_k + slot), expert e = ids[p], x row p // top_k:
           h[p, rows] = silu(x . G_e rows) * (x . U_e rows)  (G_e rows e*2F.., U_e rows e*2F+F..)
  down:    program (row tile, pair p): y[p, rows] = w[p] * (h[p] . D_e rows)

The experts are repack.Packed rows (resident experts are repacked at load where this runs).
"""
from __future__ import annotations

import torch

from .gemv import pow2_divisor
from .gemv_q8 import _KIND
from .gemv_q8_gluon import HAVE_GLUON
from .repack import Packed

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from .gemv_q8_gluon import _ar, _wdot, _xblocks

    @gluon.jit
    def _k_q8e(x_ptr, ids_ptr, wt_ptr, qs_ptr, d_ptr, m_ptr, qh_ptr, out_ptr, N, NB, RPE, KTOP,
               BITS: gl.constexpr, OFF: gl.constexpr, HAS_MIN: gl.constexpr, HAS_QH: gl.constexpr,
               GLU: gl.constexpr, BN: gl.constexpr, KB: gl.constexpr, TK: gl.constexpr, NW: gl.constexpr):
        """Rows [pid*BN, +BN) of pair q's output. GLU: gate|up stacked per expert (RPE = 2N rows each),
        x row q // KTOP, out = silu(gate) * up; else RPE = N rows each, x row q, out = wt[q] * dot.
        Dims as _k_q8g's (block, row, batch row of 1, word, value); TK threads along the blocks and
        32 // TK along the rows: the down projection's 24 blocks a row fill no warp by blocks alone."""
        L5: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4, 4], [TK, 32 // TK, 1, 1, 1], [NW, 1, 1, 1, 1],
                                            [4, 3, 2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(4, L5)
        L3: gl.constexpr = gl.SliceLayout(3, LW)
        WPB: gl.constexpr = BITS
        pid = gl.program_id(0)
        q = gl.program_id(1)
        ex = gl.load(ids_ptr + q).to(gl.int64)
        if GLU:
            xrow = q // KTOP
        else:
            xrow = q
        e = _ar(4, 4, 5, L5)
        px = x_ptr + (xrow.to(gl.int64) * (NB * 32) + _ar(KB, 0, 5, L5) * 32 + _ar(4, 3, 5, L5) * 4 + e)
        row4 = ex * RPE + gl.minimum(pid * BN + _ar(BN, 1, 4, LW), N - 1)
        pw = qs_ptr + (row4 * (NB * WPB) + _ar(KB, 0, 4, LW) * WPB + _ar(4, 3, 4, LW))
        row3 = ex * RPE + gl.minimum(pid * BN + _ar(BN, 1, 3, L3), N - 1)
        od = row3 * NB + _ar(KB, 0, 3, L3)
        pwu = pw + N * (NB * WPB)  # GLU: the up rows, N rows after the gate rows
        odu = od + N * NB
        wi = _ar(4, 3, 4, LW)
        acc = gl.zeros([KB, BN, 1], gl.float32, layout=L3)
        accu = gl.zeros([KB, BN, 1], gl.float32, layout=L3)
        for k0 in range(0, NB, KB):
            xwa, xwb, sqf, dx = _xblocks(px, e)
            acc += _wdot(pw, od, d_ptr, m_ptr, qh_ptr, xwa, xwb, sqf, dx, wi, BITS, OFF, HAS_MIN, HAS_QH)
            if GLU:
                accu += _wdot(pwu, odu, d_ptr, m_ptr, qh_ptr, xwa, xwb, sqf, dx, wi, BITS, OFF, HAS_MIN, HAS_QH)
                pwu += KB * WPB
                odu += KB
            px += KB * 32
            pw += KB * WPB
            od += KB
        y = gl.sum(acc, axis=0)  # [BN, 1]: the only cross-thread sum
        if GLU:
            y = y / (1.0 + gl.exp(-y)) * gl.sum(accu, axis=0)
        else:
            y = y * gl.load(wt_ptr + q).to(gl.float32)
        LY: gl.constexpr = gl.SliceLayout(0, L3)
        ro = pid * BN + _ar(BN, 0, 2, LY)
        gl.store(out_ptr + q.to(gl.int64) * N + ro, y, mask=ro < N)


def config(n: int, n_cols: int, pairs: int) -> tuple[int, int, int, int]:
    """(BN rows, KB blocks per step, TK threads along the blocks, warps) from the shape (graph safe):
    one block per thread (KB up to 64: two warps), the rest of a warp along the rows; BN halved
    while fewer than ~8 programs per SM of an H200 (a decode step's experts are latency bound)."""
    kb = pow2_divisor(n_cols // 32, 64)
    tk = min(kb, 32)
    nw = max(1, kb // 32)
    bn = 8
    while bn > 32 // tk and pairs * ((n + bn - 1) // bn) < 1056:
        bn //= 2
    return max(bn, 32 // tk), kb, tk, nw


def usable(x: torch.Tensor, p) -> bool:
    return HAVE_GLUON and x.is_cuda and isinstance(p, Packed) and p.qtype in _KIND


def launch(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor | None, p: Packed, rows_per_expert: int,
           n: int, out: torch.Tensor, top_k: int) -> None:
    """out (P, n) fp32 for the P = ids.numel() pairs. wts None: gate|up (p stacked per expert,
    rows_per_expert = 2n, x (T, cols)); else down (x (P, cols), out scaled by wts)."""
    bits, off, has_min, has_qh = _KIND[p.qtype]
    pairs = ids.numel()
    bn, kb, tk, nw = config(n, p.n_cols, pairs)
    glu = wts is None
    _k_q8e[((n + bn - 1) // bn, pairs)](
        x, ids, p.d if glu else wts, p.qs, p.d, p.m if p.m is not None else p.d, p.qh if p.qh is not None else p.d,
        out, n, p.n_cols // 32, rows_per_expert, top_k, BITS=bits, OFF=off, HAS_MIN=has_min, HAS_QH=has_qh,
        GLU=glu, BN=bn, KB=kb, TK=tk, NW=nw, num_warps=nw)
