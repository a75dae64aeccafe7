"""Hand-written AVX2 row dot products (LLVM IR through numba @intrinsic).

numba widens small ints to int64, which stops LLVM from using the integer multiply-add instructions
that make quantized dot products fast.  These intrinsics emit the inner loop directly in LLVM IR with
vector types:

    activations are quantized per block of 32 to int16 (xq) with a float scale xd = amax/32767 and
    xs = xd * sum(xq) (like ggml's Q8_1, but 16-bit: int8 activations cost SmolLM2 ~1% perplexity,
    int16 ~0.01%), then per weight block
        weights -> 2 x (16 x i16) (vpmovzxbw / vpmovsxbw), vpmaddwd with the activations -> 8 x i32,
        cvt -> 8 x f32, fma with the splatted scale d_w * xd into an 8-lane accumulator.

Weight layouts (built by pack()):
    nib:  qs uint8 (n_rows, nb*16) nibbles (byte j: weight j low, weight j+16 high), d, m float32
          (n_rows, nb); row . x = sum_b d*xd*sum(q*xq) + m*xs.  Q4_0 (m = -8d), Q4_1, Q4_K.
    nib5: nib + uint32 high-bit plane per block.  Q5_0, Q5_1, Q5_K.
    i8:   qs int8 (n_rows, nb*32), d float32 (n_rows, nb).  Q8_0.
    i8s16: int8 with a scale per 16.  Q6_K.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_v16i8 = ir.VectorType(_i8, 16)
_v32i8 = ir.VectorType(_i8, 32)
_v16i16 = ir.VectorType(_i16, 16)
_v8i32 = ir.VectorType(_i32, 8)
_v8f = ir.VectorType(_f32, 8)


def _fn(builder, name, ret, argtys):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


def _splat(builder, val, vty):
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, val, ir.Constant(_i32, 0))
    mask = ir.Constant(ir.VectorType(_i32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, undef, mask)


def _hsum8(builder, v):
    # (a0+a4, a1+a5, a2+a6, a3+a7) then pairwise
    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, 4), [0, 1, 2, 3]))
    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, 4), [4, 5, 6, 7]))
    s = builder.fadd(lo, hi)
    a = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(_i32, 2), [0, 1]))
    b = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(_i32, 2), [2, 3]))
    s2 = builder.fadd(a, b)
    return builder.fadd(builder.extract_element(s2, ir.Constant(_i32, 0)),
                        builder.extract_element(s2, ir.Constant(_i32, 1)))


def _data(context, builder, aty, aval):
    return context.make_array(aty)(context, builder, aval).data


def _gen_row_dot(kind):
    """Build the codegen for dot(row of weights, quantized activations) -> float32."""

    def codegen(context, builder, sig, args):
        sa = list(sig.args)
        qh_p = m_p = xs_p = None
        if kind == "nib5":  # drop the high-bit plane so the rest matches "nib"
            qh_p = _data(context, builder, sa[1], args[1])
            args = [args[0]] + list(args[2:])
            sa = [sa[0]] + sa[2:]
        if kind in ("nib", "nib5"):
            qa, da, ma, xqa, xda, xsa, offa = args
            m_p = _data(context, builder, sa[2], ma)
            xs_p = _data(context, builder, sa[5], xsa)
            xq_p = _data(context, builder, sa[3], xqa)
            xd_p = _data(context, builder, sa[4], xda)
        else:
            qa, da, xqa, xda, offa = args
            xq_p = _data(context, builder, sa[2], xqa)
            xd_p = _data(context, builder, sa[3], xda)
        q_p = _data(context, builder, sa[0], qa)
        d_p = _data(context, builder, sa[1], da)
        # offa: (row offset in blocks, n_blocks) packed as two int64 in a UniTuple
        row_b = builder.extract_value(offa, 0)
        nb = builder.extract_value(offa, 1)

        pmaddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _v8i32, [_v16i16, _v16i16])
        fma = _fn(builder, "llvm.fma.v8f32", _v8f, [_v8f, _v8f, _v8f])
        zero8 = ir.Constant(_v8f, [0.0] * 8)
        fzero = ir.Constant(_f32, 0.0)
        first16 = ir.Constant(ir.VectorType(_i32, 16), list(range(16)))
        last16 = ir.Constant(ir.VectorType(_i32, 16), list(range(16, 32)))

        entry = builder.basic_block
        loop = builder.append_basic_block("qdot.loop")
        done = builder.append_basic_block("qdot.done")
        builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(_i64, 0)), loop, done)

        builder.position_at_end(loop)
        i = builder.phi(_i64)
        acc = builder.phi(_v8f)
        macc = builder.phi(_f32)
        wb = builder.add(row_b, i)
        if kind in ("nib", "nib5"):
            qp = builder.gep(q_p, [builder.mul(wb, ir.Constant(_i64, 16))])
            qv = builder.load(builder.bitcast(qp, _v16i8.as_pointer()), align=1)
            lo = builder.and_(qv, ir.Constant(_v16i8, [15] * 16))
            hi = builder.lshr(qv, ir.Constant(_v16i8, [4] * 16))
            if kind == "nib5":
                # 5th bit of value j is bit j of the block's uint32 -> +16
                hbits = builder.load(builder.gep(qh_p, [wb]))
                hv = builder.bitcast(hbits, ir.VectorType(ir.IntType(1), 32))
                h8 = builder.shl(builder.zext(hv, _v32i8), ir.Constant(_v32i8, [4] * 32))
                lo = builder.or_(lo, builder.shuffle_vector(h8, h8, first16))
                hi = builder.or_(hi, builder.shuffle_vector(h8, h8, last16))
            w0 = builder.zext(lo, _v16i16)  # weights 0..15 (vpmovzxbw)
            w1 = builder.zext(hi, _v16i16)  # weights 16..31
        else:
            qp = builder.gep(q_p, [builder.mul(wb, ir.Constant(_i64, 32))])
            wv = builder.load(builder.bitcast(qp, _v32i8.as_pointer()), align=1)
            w0 = builder.sext(builder.shuffle_vector(wv, wv, first16), _v16i16)  # vpmovsxbw
            w1 = builder.sext(builder.shuffle_vector(wv, wv, last16), _v16i16)
        # int16 activations: 32 per block, two ymm loads
        xp = builder.bitcast(builder.gep(xq_p, [builder.mul(i, ir.Constant(_i64, 32))]), _v16i16.as_pointer())
        x0 = builder.load(xp, align=2)
        x1 = builder.load(builder.gep(xp, [ir.Constant(_i64, 1)]), align=2)
        p0 = builder.call(pmaddwd, [w0, x0])  # 8 x i32, |.| <= 2*128*32767
        p1 = builder.call(pmaddwd, [w1, x1])
        dx = builder.load(builder.gep(xd_p, [i]))
        if kind == "i8s16":
            # weights 0-15 (p0) and 16-31 (p1) have their own scales
            w2 = builder.mul(wb, ir.Constant(_i64, 2))
            d0 = builder.fmul(builder.load(builder.gep(d_p, [w2])), dx)
            d1 = builder.fmul(builder.load(builder.gep(d_p, [builder.add(w2, ir.Constant(_i64, 1))])), dx)
            acc1 = builder.call(fma, [builder.sitofp(p0, _v8f), _splat(builder, d0, _v8f), acc])
            acc2 = builder.call(fma, [builder.sitofp(p1, _v8f), _splat(builder, d1, _v8f), acc1])
        else:
            dw = builder.load(builder.gep(d_p, [wb]))
            sc = _splat(builder, builder.fmul(dw, dx), _v8f)
            pf = builder.sitofp(builder.add(p0, p1), _v8f)  # |.| <= 4*128*32767 < 2^24: exact
            acc2 = builder.call(fma, [pf, sc, acc])
        if kind in ("nib", "nib5"):
            mw = builder.load(builder.gep(m_p, [wb]))
            sx = builder.load(builder.gep(xs_p, [i]))
            macc2 = builder.fadd(macc, builder.fmul(mw, sx))
        else:
            macc2 = macc
        i2 = builder.add(i, ir.Constant(_i64, 1))
        builder.cbranch(builder.icmp_signed("<", i2, nb), loop, done)
        i.add_incoming(ir.Constant(_i64, 0), entry)
        i.add_incoming(i2, loop)
        acc.add_incoming(zero8, entry)
        acc.add_incoming(acc2, loop)
        macc.add_incoming(fzero, entry)
        macc.add_incoming(macc2, loop)

        builder.position_at_end(done)
        accf = builder.phi(_v8f)
        accf.add_incoming(zero8, entry)
        accf.add_incoming(acc2, loop)
        maccf = builder.phi(_f32)
        maccf.add_incoming(fzero, entry)
        maccf.add_incoming(macc2, loop)
        return builder.fadd(_hsum8(builder, accf), maccf)

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
