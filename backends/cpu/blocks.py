"""Kernels on the GGUF blocks themselves (layout "blk"): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Decode is memory-bound once the weights do not fit in the caches (SmolLM2 reads ~110 MB per
token): the repacked layouts (16 B nibbles + f32 d + f32 m per 32, three separate streams) read
0.75 B/weight for Q4_1 where the GGUF block (fp16 d, fp16 m, 16 B nibbles: 20 B) reads 0.625.  The
GGUF nibble order (byte j: weight j low, weight j+16 high) and the Q5 high-bit word (bit j -> weight
j) are already what the AVX2 dot products want, so these types are used in place, one stream, fp16
scales converted in the kernel (F16C vcvtph2ps).

    type  bytes  d    m            qh   qs
    Q4_0  18     0    -8d          -    2
    Q4_1  20     0    2            -    4
    Q5_0  22     0    -16d         2    6
    Q5_1  24     0    2            4    8
    Q8_0  34     0    -            -    2 (int8)

Row r, block b starts at byte (r*nb + b) * bytes.  The activations are the int16 per-32 blocks of
cpu_quant_simd (xq, xd, xs = xd*sum(xq)).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .matmul_int import _quant_row  # the activation quantizer, shared
from ...core.qtypes import QType

_i1 = ir.IntType(1)
_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f16 = ir.HalfType()
_f32 = ir.FloatType()
_v16i8 = ir.VectorType(_i8, 16)
_v32i8 = ir.VectorType(_i8, 32)
_v16i16 = ir.VectorType(_i16, 16)
_v8i32 = ir.VectorType(_i32, 8)
_v8f = ir.VectorType(_f32, 8)
_v16f = ir.VectorType(_f32, 16)

# name -> (bytes per block, m offset (-1: m = mmul*d), mmul, qh offset (-1: none), qs offset, int8)
FMT = {
    "Q4_0": (18, -1, -8.0, -1, 2, False),
    "Q4_1": (20, 2, 0.0, -1, 4, False),
    "Q5_0": (22, -1, -16.0, 2, 6, False),
    "Q5_1": (24, 2, 0.0, 4, 8, False),
    "Q8_0": (34, -1, 0.0, -1, 2, True),
}
FMT_ID = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q5_1": 3, "Q8_0": 4}
QTYPES = {QType.Q4_0: "Q4_0", QType.Q4_1: "Q4_1", QType.Q5_0: "Q5_0", QType.Q5_1: "Q5_1", QType.Q8_0: "Q8_0"}


def _fn(builder, name, ret, argtys):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


def _splat(builder, val, n):
    vty = ir.VectorType(val.type, n)
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, val, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_i32, n), [0] * n))


def _hsum8(builder, v):
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


def _f16_at(builder, p, off):
    """fp16 at byte p+off -> float32."""
    hp = builder.bitcast(builder.gep(p, [ir.Constant(_i64, off)]), _i16.as_pointer())
    return builder.fpext(builder.bitcast(builder.load(hp, align=1), _f16), _f32)


def _block_vals(builder, fmt, bp):
    """Block at byte pointer bp -> (values 0..15, values 16..31) as <16 x i8>, d, m (float32 or None)."""
    nbytes, m_off, mmul, qh_off, qs_off, is_i8 = FMT[fmt]
    first16 = ir.Constant(ir.VectorType(_i32, 16), list(range(16)))
    last16 = ir.Constant(ir.VectorType(_i32, 16), list(range(16, 32)))
    if m_off == 2:  # d, m adjacent: one 32-bit load, one vcvtph2ps for both
        hp = builder.bitcast(bp, ir.IntType(32).as_pointer())
        h2 = builder.bitcast(builder.load(hp, align=1), ir.VectorType(_f16, 2))
        dm = builder.fpext(h2, ir.VectorType(_f32, 2))
        d = builder.extract_element(dm, ir.Constant(_i32, 0))
        m_pair = builder.extract_element(dm, ir.Constant(_i32, 1))
    else:
        d = _f16_at(builder, bp, 0)
        m_pair = None
    qp = builder.gep(bp, [ir.Constant(_i64, qs_off)])
    if is_i8:
        wv = builder.load(builder.bitcast(qp, _v32i8.as_pointer()), align=1)
        return builder.shuffle_vector(wv, wv, first16), builder.shuffle_vector(wv, wv, last16), d, None
    qv = builder.load(builder.bitcast(qp, _v16i8.as_pointer()), align=1)
    lo = builder.and_(qv, ir.Constant(_v16i8, [15] * 16))
    hi = builder.lshr(qv, ir.Constant(_v16i8, [4] * 16))
    if qh_off >= 0:
        hp = builder.bitcast(builder.gep(bp, [ir.Constant(_i64, qh_off)]), _i32.as_pointer())
        hv = builder.bitcast(builder.load(hp, align=1), ir.VectorType(_i1, 32))
        h8 = builder.shl(builder.zext(hv, _v32i8), ir.Constant(_v32i8, [4] * 32))
        lo = builder.or_(lo, builder.shuffle_vector(h8, h8, first16))
        hi = builder.or_(hi, builder.shuffle_vector(h8, h8, last16))
    m = m_pair if m_off >= 0 else builder.fmul(d, ir.Constant(_f32, mmul))
    return lo, hi, d, m


def _gen_dot(fmt):
    """codegen: dot(row of GGUF blocks, int16 activations) -> float32; args (blk, xq, xd, xs, (rb, nb))."""
    nbytes, _, _, _, _, is_i8 = FMT[fmt]

    def codegen(context, builder, sig, args):
        ba, xqa, xda, xsa, offa = args
        sa = sig.args
        b_p = _data(context, builder, sa[0], ba)
        xq_p = _data(context, builder, sa[1], xqa)
        xd_p = _data(context, builder, sa[2], xda)
        xs_p = _data(context, builder, sa[3], xsa)
        rb = builder.extract_value(offa, 0)
        nb = builder.extract_value(offa, 1)
        pmaddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _v8i32, [_v16i16, _v16i16])
        fma = _fn(builder, "llvm.fma.v8f32", _v8f, [_v8f, _v8f, _v8f])
        zero8 = ir.Constant(_v8f, [0.0] * 8)
        fzero = ir.Constant(_f32, 0.0)
        c = lambda v: ir.Constant(_i64, v)

        entry = builder.basic_block
        loop = builder.append_basic_block("bdot.loop")
        done = builder.append_basic_block("bdot.done")
        builder.cbranch(builder.icmp_signed(">", nb, c(0)), loop, done)
        builder.position_at_end(loop)
        i = builder.phi(_i64)
        acc = builder.phi(_v8f)
        macc = builder.phi(_f32)
        bp = builder.gep(b_p, [builder.mul(builder.add(rb, i), c(nbytes))])
        v0, v1, d, m = _block_vals(builder, fmt, bp)
        if FMT[fmt][1] < 0 and m is not None:  # m = mmul*d: sum d*xs here, times mmul after the loop
            m = d
        ext = builder.sext if is_i8 else builder.zext
        w0 = ext(v0, _v16i16)
        w1 = ext(v1, _v16i16)
        xp = builder.bitcast(builder.gep(xq_p, [builder.mul(i, c(32))]), _v16i16.as_pointer())
        p0 = builder.call(pmaddwd, [w0, builder.load(xp, align=2)])
        p1 = builder.call(pmaddwd, [w1, builder.load(builder.gep(xp, [c(1)]), align=2)])
        dx = builder.load(builder.gep(xd_p, [i]))
        sc = _splat(builder, builder.fmul(d, dx), 8)
        acc2 = builder.call(fma, [builder.sitofp(builder.add(p0, p1), _v8f), sc, acc])
        if m is not None:
            macc2 = builder.fadd(macc, builder.fmul(m, builder.load(builder.gep(xs_p, [i]))))
        else:
            macc2 = macc
        i2 = builder.add(i, c(1))
        builder.cbranch(builder.icmp_signed("<", i2, nb), loop, done)
        i.add_incoming(c(0), entry)
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
        if FMT[fmt][1] < 0 and not is_i8:
            maccf = builder.fmul(maccf, ir.Constant(_f32, FMT[fmt][2]))
        return builder.fadd(_hsum8(builder, accf), maccf)

    return codegen


def _gen_deq(fmt):
    """codegen: blocks [rb, rb+nb) -> out[0 : 32*nb] float32; args (blk, out, (rb, nb))."""
    nbytes, _, _, _, _, is_i8 = FMT[fmt]

    def codegen(context, builder, sig, args):
        ba, oa, offa = args
        b_p = _data(context, builder, sig.args[0], ba)
        o_p = _data(context, builder, sig.args[1], oa)
        rb = builder.extract_value(offa, 0)
        nb = builder.extract_value(offa, 1)
        fma16 = _fn(builder, "llvm.fma.v16f32", _v16f, [_v16f] * 3)
        c = lambda v: ir.Constant(_i64, v)
        entry = builder.basic_block
        loop = builder.append_basic_block("bdeq.loop")
        done = builder.append_basic_block("bdeq.done")
        builder.cbranch(builder.icmp_signed(">", nb, c(0)), loop, done)
        builder.position_at_end(loop)
        i = builder.phi(_i64)
        bp = builder.gep(b_p, [builder.mul(builder.add(rb, i), c(nbytes))])
        v0, v1, d, m = _block_vals(builder, fmt, bp)
        cvt = builder.sitofp if is_i8 else builder.uitofp
        dv = _splat(builder, d, 16)
        op = builder.gep(o_p, [builder.mul(i, c(32))])
        op0 = builder.bitcast(op, _v16f.as_pointer())
        op1 = builder.bitcast(builder.gep(op, [c(16)]), _v16f.as_pointer())
        if m is None:
            builder.store(builder.fmul(cvt(v0, _v16f), dv), op0, align=4)
            builder.store(builder.fmul(cvt(v1, _v16f), dv), op1, align=4)
        else:
            mv = _splat(builder, m, 16)
            builder.store(builder.call(fma16, [cvt(v0, _v16f), dv, mv]), op0, align=4)
            builder.store(builder.call(fma16, [cvt(v1, _v16f), dv, mv]), op1, align=4)
        i2 = builder.add(i, c(1))
        builder.cbranch(builder.icmp_signed("<", i2, nb), loop, done)
        i.add_incoming(c(0), entry)
        i.add_incoming(i2, loop)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return codegen


def _make(fmt):
    @intrinsic
    def dot(typingctx, blk, xq, xd, xs, off):
        return types.float32(blk, xq, xd, xs, off), _gen_dot(fmt)

    @intrinsic
    def deq(typingctx, blk, out, off):
        return types.void(blk, out, off), _gen_deq(fmt)

    return dot, deq


dot_q4_0, deq_q4_0 = _make("Q4_0")
dot_q4_1, deq_q4_1 = _make("Q4_1")
dot_q5_0, deq_q5_0 = _make("Q5_0")
dot_q5_1, deq_q5_1 = _make("Q5_1")
dot_q8_0, deq_q8_0 = _make("Q8_0")


@njit(cache=True, nogil=True, inline="always")
def dot_blk(fmt, blk, xq, xd, xs, off):
    if fmt == 0:
        return dot_q4_0(blk, xq, xd, xs, off)
    if fmt == 1:
        return dot_q4_1(blk, xq, xd, xs, off)
    if fmt == 2:
        return dot_q5_0(blk, xq, xd, xs, off)
    if fmt == 3:
        return dot_q5_1(blk, xq, xd, xs, off)
    return dot_q8_0(blk, xq, xd, xs, off)


@njit(cache=True, nogil=True, inline="always")
def deq_blk(fmt, blk, out, off):
    if fmt == 0:
        deq_q4_0(blk, out, off)
    elif fmt == 1:
        deq_q4_1(blk, out, off)
    elif fmt == 2:
        deq_q5_0(blk, out, off)
    elif fmt == 3:
        deq_q5_1(blk, out, off)
    else:
        deq_q8_0(blk, out, off)


_JIT = dict(cache=True, nogil=True, fastmath=True, parallel=True, boundscheck=False)
_ROWS = 16
_TT = 64


@njit(**_JIT)
def mm_blk(fmt, blk, x, quant, xq, xd, xs, nb, out):
    """out (n_tok, n_rows) = x @ W^T on GGUF blocks (fmt: FMT_ID); quant: quantize x here (decode)."""
    n_tok = xq.shape[0]
    if quant:
        for t in range(n_tok):
            _quant_row(x, xq, xd, xs, t)
    n_rows = out.shape[1]
    n_groups = (n_rows + _ROWS - 1) // _ROWS
    for g in prange(n_groups):
        r1 = min(n_rows, (g + 1) * _ROWS)
        for t0 in range(0, n_tok, _TT):
            t1 = min(n_tok, t0 + _TT)
            for r in range(g * _ROWS, r1):
                off = (r * nb, nb)
                for t in range(t0, t1):
                    out[t, r] = dot_blk(fmt, blk, xq[t], xd[t], xs[t], off)
