"""The int8-activation GEMV of gemv_q8.py on the GPU, in Gluon (explicit layouts).

Same function as gemv_q8's Triton kernel (which stays as the Triton-interpreter path the CPU tests
run): x quantized to int8 per 32 values, four products per dp4a. The Triton version let the
compiler shuffle x through shared memory to pack it into words (827 GB/s on an H200 for a 66 MB
Q4_0 weight, against 2256 for the float GEMV); here each thread owns whole blocks, so quantizing,
packing and the dot products never leave its registers:

  a thread holds block b (32 values of x, as 8 int32 words of four int8) for BN weight rows and
  BP batch rows; per weight word: one or two LOP3s for the nibbles and one dp4a per four weights;
  per (block, row): one scale multiply. The only cross-thread sum is the final one.

y[n] = sum_b d[n,b] * dx[b] * (dot - OFF * sum(qx)) (+ m[n,b] * dx[b] * sum(qx)), as in gemv_q8.
"""
from __future__ import annotations

import os

import torch

from .gemv import pow2_divisor
from .repack import Packed

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_GLUON = False


if HAVE_GLUON:

    @gluon.constexpr_function
    def _lay1(L, dim, rank):
        """The 1-D layout along `dim` of a rank-`rank` layout L (every other dim sliced away)."""
        for d in reversed(range(rank)):
            if d != dim:
                L = gl.SliceLayout(d, L)
        return L

    @gluon.jit
    def _ar(n: gl.constexpr, dim: gl.constexpr, rank: gl.constexpr, L: gl.constexpr):
        """arange(n) along `dim` of a rank-`rank` tensor in layout L (size 1 elsewhere)."""
        v = gl.arange(0, n, layout=_lay1(L, dim, rank))
        for d in gl.static_range(rank):
            if d != dim:
                v = gl.expand_dims(v, d)
        return v

    @gluon.jit
    def _dp4a(a, b, c):
        return gl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _spread(h):
        """4 bits (bits 0-3 of h, the rest 0) to bit 4 of each byte: the fifth bits of four 5-bit
        quants. One multiply: h * 0x02040810 puts bit k at 4 + 8k (the four copies never overlap)."""
        return (h * 0x02040810) & 0x10101010

    @gluon.jit
    def _quant(xv, inv5, e):
        """[.., 4 words, 4 values] floats -> ([.., 4] int32 words of four int8, sum of the int8s)."""
        t = (xv * inv5 + 12582912.0).to(gl.int32, bitcast=True)  # round to nearest, in the low bits
        w = gl.sum((t & 255) << (e * 8), axis=4)  # disjoint bytes: the sum is the packed word
        s = gl.sum(_dp4a(w, gl.full_like(w, 0x01010101), gl.zeros_like(w)), axis=3)  # sum of the int8s
        return w, s

    @gluon.jit
    def _xblocks(px, e):
        """The x blocks at px ([KB, 1, BP, 4, 4] pointers to values 0-15; 16-31 follow) as int8 words for
        _wmul: (values 0-15, values 16-31, sum of the int8s as float, the block's scale), [KB, 1, BP] each."""
        xa = gl.load(px).to(gl.float32)
        xb = gl.load(px + 16).to(gl.float32)
        amax = gl.maximum(gl.max(gl.max(gl.abs(xa), axis=4), axis=3), gl.max(gl.max(gl.abs(xb), axis=4), axis=3))
        inv = gl.where(amax > 0, 127.0 / amax, 0.0)
        inv5 = gl.expand_dims(gl.expand_dims(inv, 3), 4)
        xwa, sa = _quant(xa, inv5, e)
        xwb, sb = _quant(xb, inv5, e)
        return xwa, xwb, (sa + sb).to(gl.float32), amax * (1.0 / 127.0)

    @gluon.jit
    def _wload(pw, od, d_ptr, m_ptr, qh_ptr, BITS: gl.constexpr, HAS_MIN: gl.constexpr, HAS_QH: gl.constexpr):
        """One step's weight words, scales (and mins, fifth bits) at pw / od: what _wmul multiplies."""
        w = gl.load(pw)  # [KB, BN, 1, 4]
        w2 = gl.load(pw + 4) if BITS == 8 else w
        d = gl.load(d_ptr + od)
        m = gl.load(m_ptr + od) if HAS_MIN else d
        qh = gl.load(qh_ptr + od) if HAS_QH else od
        return w, w2, d, m, qh

    @gluon.jit
    def _wmul(w, w2, d, m, qh, xwa, xwb, sqf, dx, wi,
              BITS: gl.constexpr, OFF: gl.constexpr, HAS_MIN: gl.constexpr, HAS_QH: gl.constexpr):
        """One step's [KB, BN, BP] products of loaded weight rows with the packed x."""
        if BITS == 8:
            lo = w
            hi = w2
        else:
            lo = w & 0x0F0F0F0F  # quants 4i..4i+3 of word i (low nibbles)
            hi = (w >> 4) & 0x0F0F0F0F  # quants 16+4i.. (high nibbles)
            if HAS_QH:
                q4 = gl.expand_dims(qh, 3)  # [KB, BN, 1, 1]
                lo = lo | _spread((q4 >> (4 * wi)) & 15)
                hi = hi | _spread((q4 >> (16 + 4 * wi)) & 15)
        lo, xa = gl.broadcast(lo, xwa)
        hi, xb = gl.broadcast(hi, xwb)
        dot = gl.sum(_dp4a(hi, xb, _dp4a(lo, xa, gl.zeros_like(lo))), axis=3)  # [KB, BN, BP]
        inc = d.to(gl.float32) * (dx * (dot.to(gl.float32) - OFF * sqf))
        if HAS_MIN:
            inc += m.to(gl.float32) * (dx * sqf)
        return inc

    @gluon.jit
    def _wdot(pw, od, d_ptr, m_ptr, qh_ptr, xwa, xwb, sqf, dx, wi,
              BITS: gl.constexpr, OFF: gl.constexpr, HAS_MIN: gl.constexpr, HAS_QH: gl.constexpr):
        """One step's [KB, BN, BP] products of the weight rows at pw (scales at od) with the packed x."""
        w, w2, d, m, qh = _wload(pw, od, d_ptr, m_ptr, qh_ptr, BITS, HAS_MIN, HAS_QH)
        return _wmul(w, w2, d, m, qh, xwa, xwb, sqf, dx, wi, BITS, OFF, HAS_MIN, HAS_QH)

    @gluon.jit
    def _k_q8g(x_ptr, qs_ptr, d_ptr, m_ptr, qh_ptr, out_ptr, B, N, NB, U,
               BITS: gl.constexpr, OFF: gl.constexpr, HAS_MIN: gl.constexpr, HAS_QH: gl.constexpr,
               GLU: gl.constexpr, BN: gl.constexpr, BP: gl.constexpr, KB: gl.constexpr, NW: gl.constexpr,
               PRE: gl.constexpr):
        """Rows [pid*BN, +BN) of y for all BP batch rows; KB blocks per step, one per thread.
        Dims: block, weight row, batch row, word (4 int32 = 16 quant bytes), value in word.
        GLU: y = silu(rows r) * (rows U + r) of a stacked gate|up weight (the FFN's activation in
        the epilogue: no separate launch; x is quantized once for both).
        PRE (rows of several steps): the next step's weights load before this step's products, so
        a thread has two steps' loads in flight instead of one round trip per step."""
        L5: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4, 4], [32, 1, 1, 1, 1], [NW, 1, 1, 1, 1], [4, 3, 2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(4, L5)
        L3: gl.constexpr = gl.SliceLayout(3, LW)
        WPB: gl.constexpr = BITS  # int32 words of quants per block: 4 (4-bit) or 8 (Q8_0)
        pid = gl.program_id(0)
        # x: value 16h + 4*word + e of block k0 + blk, batch row bat (clamped: no masks)
        bat5 = gl.minimum(_ar(BP, 2, 5, L5), B - 1)
        px = x_ptr + (bat5 * (NB * 32) + _ar(KB, 0, 5, L5) * 32 + _ar(4, 3, 5, L5) * 4 + _ar(4, 4, 5, L5))
        e = _ar(4, 4, 5, L5)
        row4 = gl.minimum(pid * BN + _ar(BN, 1, 4, LW), N - 1)
        pw = qs_ptr + (row4 * (NB * WPB) + _ar(KB, 0, 4, LW) * WPB + _ar(4, 3, 4, LW))
        row3 = gl.minimum(pid * BN + _ar(BN, 1, 3, L3), N - 1)
        od = row3 * NB + _ar(KB, 0, 3, L3)  # [KB, BN, 1]: where d, m, qh of (row, block) are
        pwu = pw + U * (NB * WPB)  # GLU: the up rows
        odu = od + U * NB
        wi = _ar(4, 3, 4, LW)
        acc = gl.zeros([KB, BN, BP], gl.float32, layout=L3)
        accu = gl.zeros([KB, BN, BP], gl.float32, layout=L3)
        if PRE:
            cw, cw2, cd, cm, cq = _wload(pw, od, d_ptr, m_ptr, qh_ptr, BITS, HAS_MIN, HAS_QH)
        for k0 in range(0, NB, KB):
            if PRE:  # the last step loads itself again (in bounds, unused)
                nx = (k0 + KB < NB).to(gl.int32) * KB
                nw_, nw2, nd, nm, nq = _wload(pw + nx * WPB, od + nx, d_ptr, m_ptr, qh_ptr, BITS, HAS_MIN, HAS_QH)
            xwa, xwb, sqf, dx = _xblocks(px, e)
            if PRE:
                acc += _wmul(cw, cw2, cd, cm, cq, xwa, xwb, sqf, dx, wi, BITS, OFF, HAS_MIN, HAS_QH)
                cw, cw2, cd, cm, cq = nw_, nw2, nd, nm, nq
            else:
                acc += _wdot(pw, od, d_ptr, m_ptr, qh_ptr, xwa, xwb, sqf, dx, wi, BITS, OFF, HAS_MIN, HAS_QH)
            if GLU:
                accu += _wdot(pwu, odu, d_ptr, m_ptr, qh_ptr, xwa, xwb, sqf, dx, wi, BITS, OFF, HAS_MIN, HAS_QH)
                pwu += KB * WPB
                odu += KB
            px += KB * 32
            pw += KB * WPB
            od += KB
        y = gl.sum(acc, axis=0)  # [BN, BP]: the only cross-thread sum
        if GLU:
            y = y / (1.0 + gl.exp(-y)) * gl.sum(accu, axis=0)
        LY: gl.constexpr = gl.SliceLayout(0, L3)
        ro = pid * BN + _ar(BN, 0, 2, LY)
        bo = _ar(BP, 1, 2, LY)
        gl.store(out_ptr + bo * N + ro, y.to(out_ptr.dtype.element_ty), mask=(ro < N) & (bo < B))


def config(p: Packed, batch: int) -> tuple[int, int, int]:
    """(BN rows per program, KB blocks per step, num_warps) from the shape only (graph safe): one
    block per thread; fewer rows per thread as the batch grows (registers). At batch 1-2, from the
    H200 sweep (`bench_gemv --q8 --q8-sweep`): rows that take a thread several steps (the 14336-wide
    down projection: 7) want more, smaller programs (BN 4: 2309 against 2002 GB/s at BN 8); the
    128256-row head runs best at KB 64 (4046 against 3762 GB/s)."""
    nb = p.n_cols // 32
    kb = pow2_divisor(nb, 64 if p.n_rows >= 65536 else 128)
    nw = max(1, min(4, kb // 32))
    bn = (4 if kb >= 32 and nb // kb >= 4 else 16) if batch <= 2 else 8 if batch <= 4 else 4
    while bn > 2 and p.n_rows // bn < 256:  # >= ~2 programs per SM of an H200
        bn //= 2
    return bn, kb, nw


def launch(x: torch.Tensor, p: Packed, out: torch.Tensor, kind: tuple[int, int, int, int], cfg=None,
           glu: int = 0) -> None:
    """out[:B] = x @ W^T for one launch (B <= SMALL_BATCH); x contiguous fp32/bf16/fp16. glu = F > 0:
    p is gate|up stacked (2F rows) and out[:B, :F] = silu(x @ gate^T) * (x @ up^T), in out's dtype."""
    bits, off, has_min, has_qh = kind
    bn, kb, nw = cfg or config(p, x.shape[0])
    if glu:
        bn = max(1, bn // 2)  # two accumulators per program: as many weight rows as the plain GEMV's
    n = glu or p.n_rows
    dummy = p.d
    bp = 1
    while bp < x.shape[0]:
        bp *= 2
    _k_q8g[((n + bn - 1) // bn,)](
        x, p.qs, p.d, p.m if p.m is not None else dummy, p.qh if p.qh is not None else dummy, out,
        x.shape[0], n, p.n_cols // 32, glu, BITS=bits, OFF=off, HAS_MIN=has_min, HAS_QH=has_qh,
        GLU=bool(glu), BN=bn, BP=bp, KB=kb, NW=nw, PRE=prefetch(p, kb, glu, bits, has_qh), num_warps=nw)


def prefetch(p: Packed, kb: int, glu: int, bits: int, has_qh: int) -> bool:
    """Pipeline the weight loads where a row takes a thread several steps, for the types where that
    measured faster on the H200 (4096x14336, batch 1: Q8_0 22.8 -> 19.5 us, Q5_1 19.9 -> 17.7); the
    8B Q4_0 step's GEMVs took 1523 us with it against 1494 without, so not Q4_0/Q4_1.
    LSTREAM_GEMV_PRE=0 / 1 forces it off / on."""
    env = os.environ.get("LSTREAM_GEMV_PRE")
    wanted = env == "1" or (env != "0" and (bits == 8 or bool(has_qh)))
    return wanted and not glu and p.n_cols // 32 > kb
