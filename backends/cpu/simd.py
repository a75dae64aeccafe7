"""AVX2 row dot products of the repacked layouts (nib, nib5, i8, i8s16) with int16 activations,
LLVM IR through numba @intrinsic; run inside the int16 matmul drivers (matmul_int)."""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .llvm_ir import (F32, V8F, V8I32, V16I16, array_data, counted_loop, declare, hsum8, i64, load_i8x32,
                      nibbles, splat, with_high_bits)

# numba widens small ints to int64, which stops LLVM from using the integer multiply-add instructions
# that make quantized dot products fast.  These intrinsics emit the inner loop directly in LLVM IR with
# vector types:
#
#     activations are quantized per block of 32 to int16 (xq) with a float scale xd = amax/32767 and
#     xs = xd * sum(xq) (like ggml's Q8_1, but 16-bit: int8 activations cost SmolLM2 ~1% perplexity,
#     int16 ~0.01%), then per weight block
#         weights -> 2 x (16 x i16) (vpmovzxbw / vpmovsxbw), vpmaddwd with the activations -> 8 x i32,
#         cvt -> 8 x f32, fma with the splatted scale d_w * xd into an 8-lane accumulator.
#
# Weight layouts (built by pack()):
#     nib:  qs uint8 (n_rows, nb*16) nibbles (byte j: weight j low, weight j+16 high), d, m float32
#           (n_rows, nb); row . x = sum_b d*xd*sum(q*xq) + m*xs.  Q4_K (with fp16 d, m: nib_half.py).
#     nib5: nib + uint32 high-bit plane per block.  Q5_K.
# The kernels take d and m as bytes (uint8 arrays): one matmul driver serves fp32 and fp16 scales.
#     i8:   qs int8 (n_rows, nb*32), d float32 (n_rows, nb).  Q8_0.
#     i8s16: int8 with a scale per 16.  Q6_K.


def _gen_row_dot(kind):
    """Build the codegen for dot(row of weights, quantized activations) -> float32."""

    def codegen(context, builder, sig, args):
        sa = list(sig.args)
        qh_p = m_p = xs_p = None
        if kind == "nib5":  # drop the high-bit plane so the rest matches "nib"
            qh_p = array_data(context, builder, sa[1], args[1])
            args = [args[0]] + list(args[2:])
            sa = [sa[0]] + sa[2:]
        if kind in ("nib", "nib5"):
            qa, da, ma, xqa, xda, xsa, offa = args
            m_p = builder.bitcast(array_data(context, builder, sa[2], ma), F32.as_pointer())
            xs_p = array_data(context, builder, sa[5], xsa)
            xq_p = array_data(context, builder, sa[3], xqa)
            xd_p = array_data(context, builder, sa[4], xda)
        else:
            qa, da, xqa, xda, offa = args
            xq_p = array_data(context, builder, sa[2], xqa)
            xd_p = array_data(context, builder, sa[3], xda)
        q_p = array_data(context, builder, sa[0], qa)
        d_p = builder.bitcast(array_data(context, builder, sa[1], da), F32.as_pointer())  # scales as bytes
        # offa: (row offset in blocks, n_blocks) packed as two int64 in a UniTuple
        row_b = builder.extract_value(offa, 0)
        nb = builder.extract_value(offa, 1)
        pmaddwd = declare(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16])
        fma = declare(builder, "llvm.fma.v8f32", V8F, [V8F, V8F, V8F])

        def block(i, acc, macc):
            wb = builder.add(row_b, i)
            if kind in ("nib", "nib5"):
                lo, hi = nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))
                if kind == "nib5":  # 5th bit of value j is bit j of the block's uint32 -> +16
                    lo, hi = with_high_bits(builder, lo, hi, builder.load(builder.gep(qh_p, [wb])))
                w0 = builder.zext(lo, V16I16)  # weights 0..15 (vpmovzxbw)
                w1 = builder.zext(hi, V16I16)  # weights 16..31
            else:
                lo, hi = load_i8x32(builder, builder.gep(q_p, [builder.mul(wb, i64(32))]))
                w0 = builder.sext(lo, V16I16)  # vpmovsxbw
                w1 = builder.sext(hi, V16I16)
            # int16 activations: 32 per block, two ymm loads
            xp = builder.bitcast(builder.gep(xq_p, [builder.mul(i, i64(32))]), V16I16.as_pointer())
            x0 = builder.load(xp, align=2)
            x1 = builder.load(builder.gep(xp, [i64(1)]), align=2)
            p0 = builder.call(pmaddwd, [w0, x0])  # 8 x i32, |.| <= 2*128*32767
            p1 = builder.call(pmaddwd, [w1, x1])
            dx = builder.load(builder.gep(xd_p, [i]))
            if kind == "i8s16":
                # weights 0-15 (p0) and 16-31 (p1) have their own scales
                w2 = builder.mul(wb, i64(2))
                d0 = builder.fmul(builder.load(builder.gep(d_p, [w2])), dx)
                d1 = builder.fmul(builder.load(builder.gep(d_p, [builder.add(w2, i64(1))])), dx)
                acc1 = builder.call(fma, [builder.sitofp(p0, V8F), splat(builder, d0, 8), acc])
                acc2 = builder.call(fma, [builder.sitofp(p1, V8F), splat(builder, d1, 8), acc1])
            else:
                dw = builder.load(builder.gep(d_p, [wb]))
                sc = splat(builder, builder.fmul(dw, dx), 8)
                pf = builder.sitofp(builder.add(p0, p1), V8F)  # |.| <= 4*128*32767 < 2^24: exact
                acc2 = builder.call(fma, [pf, sc, acc])
            if kind in ("nib", "nib5"):
                mw = builder.load(builder.gep(m_p, [wb]))
                sx = builder.load(builder.gep(xs_p, [i]))
                return acc2, builder.fadd(macc, builder.fmul(mw, sx))
            return acc2, macc

        acc, macc = counted_loop(builder, nb, [ir.Constant(V8F, [0.0] * 8), ir.Constant(F32, 0.0)], block, "qdot")
        return builder.fadd(hsum8(builder, acc), macc)

    return codegen


@intrinsic
def dot_nib_row(typingctx, q, d, m, xq, xd, xs, off):
    """sum_b d[rb+b]*xd[b]*dot(nibbles of block rb+b, xq[b]) + m[rb+b]*xs[b]; off = (rb, nb)."""
    sig = types.float32(q, d, m, xq, xd, xs, off)
    return sig, _gen_row_dot("nib")


@intrinsic
def dot_i8_row(typingctx, q, d, xq, xd, off):
    """sum_b d[rb+b]*xd[b]*dot(int8 block rb+b, xq[b]); off = (rb, nb)."""
    sig = types.float32(q, d, xq, xd, off)
    return sig, _gen_row_dot("i8")


@intrinsic
def dot_i8s16_row(typingctx, q, d16, xq, xd, off):
    """Like dot_i8_row with one weight scale per 16 values: d16[2*(rb+b)], d16[2*(rb+b)+1]."""
    sig = types.float32(q, d16, xq, xd, off)
    return sig, _gen_row_dot("i8s16")


@intrinsic
def dot_nib5_row(typingctx, q, qh, d, m, xq, xd, xs, off):
    """Like dot_nib_row with 5-bit values: bit j of qh[rb+b] (uint32) adds 16 to value j."""
    sig = types.float32(q, qh, d, m, xq, xd, xs, off)
    return sig, _gen_row_dot("nib5")
