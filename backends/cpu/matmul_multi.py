"""Dot products of one weight row with 4 tokens at a time (AVX2, LLVM IR), for batches of a few
tokens (continuous batching's decode steps: one token per sequence). matmul_int's tile loop calls
them for each group of 4 tokens of the "nib" and "blk" layouts.

A row dot per token (simd.dot_nib_row, blocks.dot_blk) unpacks the weight block again for every
token and carries one FMA chain: at 8 tokens a decode step costs 8 single steps (the kernels are
compute bound once the weights are read). Here a block is unpacked once for 4 tokens and the 4
tokens' chains are independent. Each token's arithmetic is the single-token kernel's, operation
for operation and in the same order (int16 activations, vpmaddwd, one 8-lane FMA accumulator and a
scalar m term per token, summed as hsum8(acc) + m): results are bitwise equal to the one-token
dot, so a sequence's tokens do not depend on how many others share its batch.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .blocks import FMT, _block_vals, dot_blk, q8_dots
from .llvm_ir import (F32, I8, V8F, V8I32, V16I16, array_data, counted_loop, declare, hsum8, i64, nibbles,
                      splat)
from .jit import INLINE
from .nib_half import dot4_nibw, dot4_nibw8, dot_nibw8_row, dot_nibw_row
from .simd import dot_nib_row

N_MULTI = 4  # tokens per multi-token dot


def _row_ptrs(context, builder, aty, aval, t0, n: int):
    """Pointers to rows t0 .. t0+n-1 of a 2-D array (its own row stride, in bytes)."""
    arr = context.make_array(aty)(context, builder, aval)
    stride = builder.extract_value(arr.strides, 0)
    base = builder.bitcast(arr.data, I8.as_pointer())
    elt = arr.data.type
    return [builder.bitcast(builder.gep(base, [builder.mul(builder.add(t0, i64(j)), stride)]), elt)
            for j in range(n)]


def _gen(kind, fmt=None):
    """codegen of a 4-token dot: (weights..., xq, xd, xs, t0, (rb, nb)) -> UniTuple(float32, 4).
    kind "nib": args (qs, d, m, ...) of the repacked nibble layout; "blk": (blocks, ...) of GGUF
    blocks of type fmt."""
    n = N_MULTI

    def codegen(context, builder, sig, args):
        sa = list(sig.args)
        if kind == "nib":
            qa, da, ma = args[:3]
            q_p = array_data(context, builder, sa[0], qa)
            d_p = builder.bitcast(array_data(context, builder, sa[1], da), F32.as_pointer())  # scales as bytes
            m_p = builder.bitcast(array_data(context, builder, sa[2], ma), F32.as_pointer())
            k = 3
        else:
            b_p = array_data(context, builder, sa[0], args[0])
            k = 1
        xqa, xda, xsa, t0, offa = args[k:]
        xq = _row_ptrs(context, builder, sa[k], xqa, t0, n)
        xd = _row_ptrs(context, builder, sa[k + 1], xda, t0, n)
        xs = _row_ptrs(context, builder, sa[k + 2], xsa, t0, n)
        rb = builder.extract_value(offa, 0)
        nb = builder.extract_value(offa, 1)
        if kind == "blk" and fmt == "Q8_0":  # the 1-token dot's own generator (blocks.q8_dots)
            return context.make_tuple(builder, sig.return_type, q8_dots(builder, b_p, xq, xd, rb, nb))
        pmaddwd = declare(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16])
        fma = declare(builder, "llvm.fma.v8f32", V8F, [V8F, V8F, V8F])
        has_m = kind == "nib" or FMT[fmt][5] is False
        scaled_m = kind == "blk" and FMT[fmt][1] < 0 and not FMT[fmt][5]  # m = mmul*d: sum d*xs, times mmul after the loop

        def block(i, *carried):
            accs, maccs = carried[:n], carried[n:]
            wb = builder.add(rb, i)
            if kind == "nib":
                lo, hi = nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))
                dw = builder.load(builder.gep(d_p, [wb]))
                mw = builder.load(builder.gep(m_p, [wb]))
                w0, w1 = builder.zext(lo, V16I16), builder.zext(hi, V16I16)
            else:
                bp = builder.gep(b_p, [builder.mul(wb, i64(FMT[fmt][0]))])
                lo, hi, dw, mw = _block_vals(builder, fmt, bp)
                if scaled_m and mw is not None:
                    mw = dw
                ext = builder.sext if FMT[fmt][5] else builder.zext
                w0, w1 = ext(lo, V16I16), ext(hi, V16I16)
            out_a, out_m = [], []
            for j in range(n):
                xp = builder.bitcast(builder.gep(xq[j], [builder.mul(i, i64(32))]), V16I16.as_pointer())
                p0 = builder.call(pmaddwd, [w0, builder.load(xp, align=2)])
                p1 = builder.call(pmaddwd, [w1, builder.load(builder.gep(xp, [i64(1)]), align=2)])
                dx = builder.load(builder.gep(xd[j], [i]))
                sc = splat(builder, builder.fmul(dw, dx), 8)
                out_a.append(builder.call(fma, [builder.sitofp(builder.add(p0, p1), V8F), sc, accs[j]]))
                if has_m:
                    sx = builder.load(builder.gep(xs[j], [i]))
                    out_m.append(builder.fadd(maccs[j], builder.fmul(mw, sx)))
                else:
                    out_m.append(maccs[j])
            return out_a + out_m

        zero8, zero = ir.Constant(V8F, [0.0] * 8), ir.Constant(F32, 0.0)
        res = counted_loop(builder, nb, [zero8] * n + [zero] * n, block, "dot4")
        vals = []
        for j in range(n):
            macc = res[n + j]
            if scaled_m:
                macc = builder.fmul(macc, ir.Constant(F32, FMT[fmt][2]))
            vals.append(builder.fadd(hsum8(builder, res[j]), macc))
        return context.make_tuple(builder, sig.return_type, vals)

    return codegen


_RET = types.UniTuple(types.float32, N_MULTI)


@intrinsic
def dot4_nib(typingctx, q, d, m, xq, xd, xs, t0, off):
    """Rows t0..t0+3 of (xq, xd, xs) dotted with weight row off = (rb, nb) of the nib layout:
    4 x simd.dot_nib_row, bitwise."""
    return _RET(q, d, m, xq, xd, xs, t0, off), _gen("nib")


def _make_blk(fmt):
    @intrinsic
    def dot4(typingctx, blk, xq, xd, xs, t0, off):
        return _RET(blk, xq, xd, xs, t0, off), _gen("blk", fmt)
    return dot4


dot4_q4_0 = _make_blk("Q4_0")
dot4_q4_1 = _make_blk("Q4_1")
dot4_q5_0 = _make_blk("Q5_0")
dot4_q5_1 = _make_blk("Q5_1")
dot4_q8_0 = _make_blk("Q8_0")


@njit(cache=True, nogil=True, inline="always")
def _dot4_blk(fmt, blk, xq, xd, xs, t0, off):
    if fmt == 0:
        return dot4_q4_0(blk, xq, xd, xs, t0, off)
    if fmt == 1:
        return dot4_q4_1(blk, xq, xd, xs, t0, off)
    if fmt == 2:
        return dot4_q5_0(blk, xq, xd, xs, t0, off)
    if fmt == 3:
        return dot4_q5_1(blk, xq, xd, xs, t0, off)
    return dot4_q8_0(blk, xq, xd, xs, t0, off)


@njit(**INLINE)
def tile_nib(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, out):
    """out[t0:t1, r0:r1] for the nib layout: 4 tokens per row pass, the rest one by one."""
    for r in range(r0, r1):
        t = t0
        while t + N_MULTI <= t1:
            a, b, c, e = dot4_nib(qs, d, m, xq, xd, xs, t, (r * nb, nb))
            out[t, r] = a
            out[t + 1, r] = b
            out[t + 2, r] = c
            out[t + 3, r] = e
            t += N_MULTI
        while t < t1:
            out[t, r] = dot_nib_row(qs, d, m, xq[t], xd[t], xs[t], (r * nb, nb))
            t += 1


@njit(**INLINE)
def tile_nibw(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, mmul, out):
    """tile_nib for the "nibw" layout (nib_half.py)."""
    for r in range(r0, r1):
        t = t0
        while t + N_MULTI <= t1:
            a, b, c, e = dot4_nibw(qs, d, m, xq, xd, xs, t, (r * nb, nb), mmul)
            out[t, r] = a
            out[t + 1, r] = b
            out[t + 2, r] = c
            out[t + 3, r] = e
            t += N_MULTI
        while t < t1:
            out[t, r] = dot_nibw_row(qs, d, m, xq[t], xd[t], xs[t], (r * nb, nb), mmul)
            t += 1


@njit(**INLINE)
def tile_nibw8(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, mmul, out):
    """tile_nibw with int8 activations (L_NIBW8)."""
    for r in range(r0, r1):
        t = t0
        while t + N_MULTI <= t1:
            a, b, c, e = dot4_nibw8(qs, d, m, xq, xd, xs, t, (r * nb, nb), mmul)
            out[t, r] = a
            out[t + 1, r] = b
            out[t + 2, r] = c
            out[t + 3, r] = e
            t += N_MULTI
        while t < t1:
            out[t, r] = dot_nibw8_row(qs, d, m, xq[t], xd[t], xs[t], (r * nb, nb), mmul)
            t += 1


@njit(**INLINE)
def tile_blk(fmt, qs, xq, xd, xs, nb, r0, r1, t0, t1, out):
    """out[t0:t1, r0:r1] for GGUF blocks of type fmt (blocks.FMT_ID), 4 tokens per row pass."""
    for r in range(r0, r1):
        t = t0
        while t + N_MULTI <= t1:
            a, b, c, e = _dot4_blk(fmt, qs, xq, xd, xs, t, (r * nb, nb))
            out[t, r] = a
            out[t + 1, r] = b
            out[t + 2, r] = c
            out[t + 3, r] = e
            t += N_MULTI
        while t < t1:
            out[t, r] = dot_blk(fmt, qs, xq[t], xd[t], xs[t], (r * nb, nb))
            t += 1
