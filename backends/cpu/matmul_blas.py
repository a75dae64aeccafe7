"""Prefill matmul (from GEMM_MIN_TOKENS tokens): each numba thread dequantizes tiles of its weight
rows (AVX2 IR) into its own float32 buffer and multiplies them with OpenBLAS sgemm (blas.py)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from .blas import sgemm_nt
from .blocks import deq_blk
from .jit import PAR
from .nib_half import word_nibbles
from .llvm_ir import F16, F32 as F32T, V8F, V16F, array_data, counted_loop, declare, i64, load_i8x32, nibbles, splat, with_high_bits

# Why: a float32 sgemm runs near the FMA peak (~45 G weight*tokens/s per core here) where the int16
# dot kernels reach ~20-25, and the dequantization of a tile is paid once per ubatch, not per token.
# The dequantization here is AVX2 LLVM IR (uitofp/sitofp + fma on 16-lane vectors), ~10x the scalar
# numba loops; it serves the matmul only (dequant.dequantize stays the bit-exact path).

def _gen_deq_row(kind, half=False):
    """codegen: dequantize blocks [rb, rb+nb) of a packed layout into out[0:32*nb] (float32). d, m:
    the scales as bytes, float32 or (half) float16 with m times the last argument (mmul)."""
    sty = F16 if half else F32T

    def codegen(context, builder, sig, args):
        sa, args = list(sig.args), list(args)
        mmul = args.pop() if half else None
        if kind == "nib5":
            q_a, qh_a, d_a, m_a, o_a, off = args
            qh_p = array_data(context, builder, sa[1], qh_a)
            sa = [sa[0]] + sa[2:]
        elif kind in ("nib", "nibw"):
            q_a, d_a, m_a, o_a, off = args
        else:
            q_a, d_a, o_a, off = args
            m_a = None
            sa = sa[:2] + [None] + sa[2:]
        q_p = array_data(context, builder, sa[0], q_a)
        d_p = builder.bitcast(array_data(context, builder, sa[1], d_a), sty.as_pointer())
        m_p = builder.bitcast(array_data(context, builder, sa[2], m_a), sty.as_pointer()) if m_a is not None else None
        o_p = array_data(context, builder, sa[3], o_a)

        def scale(p, wb):
            v = builder.load(builder.gep(p, [wb]))
            return builder.fpext(v, F32T) if half else v
        rb = builder.extract_value(off, 0)
        nb = builder.extract_value(off, 1)
        fma16 = declare(builder, "llvm.fma.v16f32", V16F, [V16F] * 3)
        fma8 = declare(builder, "llvm.fma.v8f32", V8F, [V8F] * 3)

        def block(i):
            wb = builder.add(rb, i)
            op = builder.gep(o_p, [builder.mul(i, i64(32))])
            op0 = builder.bitcast(op, V16F.as_pointer())
            op1 = builder.bitcast(builder.gep(op, [i64(16)]), V16F.as_pointer())
            if kind == "nibw":  # word order: values 8k .. 8k+7 in the k-th <8 x i16>
                dv, mw = splat(builder, scale(d_p, wb), 8), scale(m_p, wb)
                mv = splat(builder, builder.fmul(mw, mmul), 8)
                for k, v in enumerate(word_nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))):
                    builder.store(builder.call(fma8, [builder.uitofp(v, V8F), dv, mv]),
                                  builder.bitcast(builder.gep(op, [i64(8 * k)]), V8F.as_pointer()), align=4)
            elif kind in ("nib", "nib5"):
                lo, hi = nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))
                if kind == "nib5":
                    lo, hi = with_high_bits(builder, lo, hi, builder.load(builder.gep(qh_p, [wb])))
                dv = splat(builder, scale(d_p, wb), 16)
                mw = scale(m_p, wb)
                mv = splat(builder, builder.fmul(mw, mmul) if half else mw, 16)
                builder.store(builder.call(fma16, [builder.uitofp(lo, V16F), dv, mv]), op0, align=4)
                builder.store(builder.call(fma16, [builder.uitofp(hi, V16F), dv, mv]), op1, align=4)
            else:
                v0, v1 = load_i8x32(builder, builder.gep(q_p, [builder.mul(wb, i64(32))]))
                w0 = builder.sitofp(v0, V16F)
                w1 = builder.sitofp(v1, V16F)
                if kind == "i8":
                    d0 = d1 = splat(builder, builder.load(builder.gep(d_p, [wb])), 16)
                else:  # i8s16: a scale per 16
                    w2 = builder.mul(wb, i64(2))
                    d0 = splat(builder, builder.load(builder.gep(d_p, [w2])), 16)
                    d1 = splat(builder, builder.load(builder.gep(d_p, [builder.add(w2, i64(1))])), 16)
                builder.store(builder.fmul(w0, d0), op0, align=4)
                builder.store(builder.fmul(w1, d1), op1, align=4)
            return ()

        counted_loop(builder, nb, [], block, "deq")
        return context.get_dummy_value()

    return codegen


@intrinsic
def deq_row_nib(typingctx, q, d, m, out, off):
    return types.void(q, d, m, out, off), _gen_deq_row("nib")


@intrinsic
def deq_row_nib5(typingctx, q, qh, d, m, out, off):
    return types.void(q, qh, d, m, out, off), _gen_deq_row("nib5")


@intrinsic
def deq_row_nibw(typingctx, q, d, m, out, off, mmul):
    return types.void(q, d, m, out, off, mmul), _gen_deq_row("nibw", True)


@intrinsic
def deq_row_nib5h(typingctx, q, qh, d, m, out, off, mmul):
    return types.void(q, qh, d, m, out, off, mmul), _gen_deq_row("nib5", True)


@intrinsic
def deq_row_i8(typingctx, q, d, out, off):
    return types.void(q, d, out, off), _gen_deq_row("i8")


@intrinsic
def deq_row_i8s16(typingctx, q, d, out, off):
    return types.void(q, d, out, off), _gen_deq_row("i8s16")


# layout codes for mm_deq_sgemm; BLK + blocks.FMT_ID: GGUF blocks in place
NIB, NIB5, I8, I8S16, F32, NIBW, NIB5H, BLK = 0, 1, 2, 3, 4, 5, 6, 7
LAYOUT_CODE = {"nib": NIB, "nib5": NIB5, "i8": I8, "i8s16": I8S16, "blk": BLK, "nibw": NIBW, "nib5h": NIB5H}

_JIT = PAR


@njit(**_JIT)
def mm_deq_sgemm(layout, q, qh, d, m, mmul, wf, x, out, tile, n_threads):
    """out (T, N) = x (T, K) @ W^T.  Rows of W are split evenly over the threads; each thread
    dequantizes `tile` rows at a time into its own buffer and calls sgemm on them.  F32: wf (N, K)
    is multiplied directly (no buffer).  d, m: the scales as bytes; mmul (float32): m's multiplier
    for fp16 scales.  n_threads: numba.get_num_threads() (passed in: the jitted get_num_threads
    embeds an address, which would stop the on-disk cache)."""
    n_tok, k = x.shape
    n = out.shape[1]
    nb = k // 32
    nch = max(1, min(n_threads, (n + 15) // 16))
    xp = x.ctypes.data
    op = out.ctypes.data
    for c in prange(nch):
        r0 = c * n // nch
        r1 = (c + 1) * n // nch
        if layout == F32:
            sgemm_nt(n_tok, r1 - r0, k, xp, k, wf.ctypes.data + 4 * r0 * k, k, op + 4 * r0, n)
            continue
        buf = np.empty((min(tile, r1 - r0), k), np.float32)
        bp = buf.ctypes.data
        for a in range(r0, r1, tile):
            b = min(r1, a + tile)
            for r in range(a, b):
                row = buf[r - a]
                if layout == NIBW:
                    deq_row_nibw(q, d, m, row, (r * nb, nb), mmul)
                elif layout == NIB5H:
                    deq_row_nib5h(q, qh, d, m, row, (r * nb, nb), mmul)
                elif layout == NIB:
                    deq_row_nib(q, d, m, row, (r * nb, nb))
                elif layout == NIB5:
                    deq_row_nib5(q, qh, d, m, row, (r * nb, nb))
                elif layout >= BLK:
                    deq_blk(layout - BLK, q, row, (r * nb, nb))
                elif layout == I8:
                    deq_row_i8(q, d, row, (r * nb, nb))
                else:
                    deq_row_i8s16(q, d, row, (r * nb, nb))
            sgemm_nt(n_tok, b - a, k, xp, k, bp, k, op + 4 * a, n)
