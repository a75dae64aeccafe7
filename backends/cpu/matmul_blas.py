"""Prefill matmul: dequantize a tile of weight rows into a per-thread float32 buffer and multiply it
with OpenBLAS sgemm, called from inside numba's parallel loop (one BLAS thread per numba thread).

Why: a float32 sgemm runs near the FMA peak (~45 G weight*tokens/s per core here) where the int16
dot kernels reach ~20-25, and the dequantization of a tile is paid once per ubatch, not per token.
Calling numpy's matmul between numba kernels does not work on a small machine: numba's OpenMP
workers and OpenBLAS's own threads both spin and collapse each other (tools/kernel_notes.md).  So
numba owns the threads and each of them calls the single-threaded sgemm of numpy's own OpenBLAS
(scipy_openblas64_, shipped in numpy's wheels) on its rows; OpenBLAS's pool is set to one thread
around the call, so its threads never wake.

The sgemm is reached through a named symbol (llvmlite add_symbol) so that numba's on-disk cache
holds no process-specific address.  If numpy carries no such OpenBLAS, AVAILABLE is False and the
caller keeps the integer kernels.

Dequantization here is AVX2 LLVM IR (uitofp/sitofp + fma on 8-lane vectors), ~10x the scalar numba
loops; it is used only for matmul (dequantize() stays the bit-exact path).
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import llvm_ir as L
from .blocks import deq_blk
from .llvm_ir import (V16F, array_data, counted_loop, declare, i64, load_i8x32, nibbles, splat,
                      with_high_bits)
from .vmath import vexp

_SYM = "lstream_cblas_sgemm_ilp64"


def _openblas():
    """numpy's OpenBLAS (ILP64, scipy_openblas64_ naming) as a ctypes library, or None."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1] if len(line.split()) >= 6 else ""
                if "openblas" in os.path.basename(p).lower() and p not in paths:
                    paths.append(p)
    except OSError:
        pass
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
            sg = lib.scipy_cblas_sgemm64_
            gt = lib.scipy_openblas_get_num_threads64_
            st = lib.scipy_openblas_set_num_threads64_
        except (OSError, AttributeError):
            continue
        return lib, sg, gt, st
    return None


AVAILABLE = False
_get_threads = _set_threads = None
if os.environ.get("LSTREAM_NO_BLAS_PREFILL") != "1":
    _lib = _openblas()
    if _lib is not None:
        import llvmlite.binding as _llb

        _, _sg, _gt, _st = _lib
        _gt.restype = ctypes.c_int
        _gt.argtypes = []
        _st.restype = None
        _st.argtypes = [ctypes.c_int]
        _get_threads, _set_threads = _gt, _st
        _llb.add_symbol(_SYM, ctypes.cast(_sg, ctypes.c_void_p).value)
        AVAILABLE = True


class one_blas_thread:
    """OpenBLAS's own pool at 1 thread for the duration (restored after)."""

    def __enter__(self):
        self.n = _get_threads()
        if self.n != 1:
            _set_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            _set_threads(self.n)


_F32P = L.F32.as_pointer()


@intrinsic
def sgemm(typingctx, transb, m, n, k, alpha, a, lda, b, ldb, c, ldc):
    """C[m, n] (row-major, ldc) = alpha * A[m, k] (lda) @ op(B), op(B) = B[n, k]^T (transb=True) or
    B[k, n] (transb=False); pointers as integers."""
    sig = types.void(transb, m, n, k, alpha, a, lda, b, ldb, c, ldc)

    def codegen(context, builder, sig, args):
        tb = builder.select(context.cast(builder, args[0], sig.args[0], types.boolean),
                            ir.Constant(L.I32, 112), ir.Constant(L.I32, 111))
        al = context.cast(builder, args[4], sig.args[4], types.float32)
        vals = [context.cast(builder, v, t, types.int64) for v, t in zip(args, sig.args)]
        _, m_, n_, k_, _, a_, lda_, b_, ldb_, c_, ldc_ = vals
        fn = declare(builder, _SYM, ir.VoidType(), [L.I32, L.I32, L.I32, L.I64, L.I64, L.I64, L.F32, _F32P, L.I64,
                                                    _F32P, L.I64, L.F32, _F32P, L.I64])
        builder.call(fn, [ir.Constant(L.I32, 101), ir.Constant(L.I32, 111), tb, m_, n_, k_, al,
                          builder.inttoptr(a_, _F32P), lda_, builder.inttoptr(b_, _F32P), ldb_,
                          ir.Constant(L.F32, 0.0), builder.inttoptr(c_, _F32P), ldc_])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def sgemm_nt(m, n, k, a, lda, b, ldb, c, ldc):
    """C[m, n] = A[m, k] @ B[n, k]^T."""
    sgemm(True, m, n, k, np.float32(1.0), a, lda, b, ldb, c, ldc)


def _gen_deq_row(kind):
    """codegen: dequantize blocks [rb, rb+nb) of a packed layout into out[0:32*nb] (float32)."""

    def codegen(context, builder, sig, args):
        sa = list(sig.args)
        if kind == "nib5":
            q_a, qh_a, d_a, m_a, o_a, off = args
            qh_p = array_data(context, builder, sa[1], qh_a)
            sa = [sa[0]] + sa[2:]
        elif kind in ("nib",):
            q_a, d_a, m_a, o_a, off = args
        else:
            q_a, d_a, o_a, off = args
            m_a = None
            sa = sa[:2] + [None] + sa[2:]
        q_p = array_data(context, builder, sa[0], q_a)
        d_p = array_data(context, builder, sa[1], d_a)
        m_p = array_data(context, builder, sa[2], m_a) if m_a is not None else None
        o_p = array_data(context, builder, sa[3], o_a)
        rb = builder.extract_value(off, 0)
        nb = builder.extract_value(off, 1)
        fma16 = declare(builder, "llvm.fma.v16f32", V16F, [V16F] * 3)

        def block(i):
            wb = builder.add(rb, i)
            op = builder.gep(o_p, [builder.mul(i, i64(32))])
            op0 = builder.bitcast(op, V16F.as_pointer())
            op1 = builder.bitcast(builder.gep(op, [i64(16)]), V16F.as_pointer())
            if kind in ("nib", "nib5"):
                lo, hi = nibbles(builder, builder.gep(q_p, [builder.mul(wb, i64(16))]))
                if kind == "nib5":
                    lo, hi = with_high_bits(builder, lo, hi, builder.load(builder.gep(qh_p, [wb])))
                dv = splat(builder, builder.load(builder.gep(d_p, [wb])), 16)
                mv = splat(builder, builder.load(builder.gep(m_p, [wb])), 16)
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
def deq_row_i8(typingctx, q, d, out, off):
    return types.void(q, d, out, off), _gen_deq_row("i8")


@intrinsic
def deq_row_i8s16(typingctx, q, d, out, off):
    return types.void(q, d, out, off), _gen_deq_row("i8s16")


# layout codes for mm_deq_sgemm; BLK + cpu_quant_blk.FMT_ID: GGUF blocks in place
NIB, NIB5, I8, I8S16, F32, BLK = 0, 1, 2, 3, 4, 5

_JIT = dict(cache=True, nogil=True, fastmath=True, parallel=True, boundscheck=False)


@njit(**_JIT)
def mm_deq_sgemm(layout, q, qh, d, m, wf, x, out, tile, n_threads):
    """out (T, N) = x (T, K) @ W^T.  Rows of W are split evenly over the threads; each thread
    dequantizes `tile` rows at a time into its own buffer and calls sgemm on them.  F32: wf (N, K)
    is multiplied directly (no buffer).  n_threads: numba.get_num_threads() (passed in: the jitted
    get_num_threads embeds an address, which would stop the on-disk cache)."""
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
                if layout == NIB:
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


_SER = dict(cache=True, nogil=True, fastmath=True, boundscheck=False)
ATT_BQ = 64  # queries per attention work item


@njit(**_SER)
def _softmax_rows(sc, t0, t1, n_past, lo, window):
    """Row r = t - t0 of sc holds the scores of query t over keys [lo, lo + sc.shape[1]); keep its causal
    (and windowed) range, softmax it, zero the rest."""
    L = sc.shape[1]
    for t in range(t0, t1):
        row = sc[t - t0]
        pos = n_past + t
        a = 0
        if window > 0:
            a = max(lo, pos - window + 1) - lo
        b = pos - lo + 1
        mx = np.float32(-3.0e38)
        for j in range(a, b):
            mx = max(mx, row[j])
        for j in range(a, b):
            row[j] -= mx
        vexp(row, a, b - a)
        tot = np.float32(0.0)
        for j in range(a, b):
            tot += row[j]
        inv = np.float32(1.0) / tot
        for j in range(a, b):
            row[j] *= inv
        for j in range(0, a):
            row[j] = np.float32(0.0)
        for j in range(b, L):
            row[j] = np.float32(0.0)


@njit(**_JIT)
def attention_sgemm(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    """Prefill attention per (head, block of ATT_BQ queries): S = scale * Q K^T over the block's key
    range (sgemm), masked softmax (vectorized exp), O = P V (sgemm).  q/out (T, n_head*hd), kc/vc
    (n_ctx, n_kv, hd), all float32 C-contiguous."""
    n_tok = q.shape[0]
    g = n_head // n_kv
    n_qb = (n_tok + ATT_BQ - 1) // ATT_BQ
    qp = q.ctypes.data
    kp = kc.ctypes.data
    vp = vc.ctypes.data
    op = out.ctypes.data
    ldq = n_head * hd
    ldk = n_kv * hd
    for it in prange(n_head * n_qb):
        h = it // n_qb
        qb = it % n_qb
        kh = h // g
        t0 = qb * ATT_BQ
        t1 = min(n_tok, t0 + ATT_BQ)
        lo = 0
        if window > 0:
            lo = max(0, n_past + t0 - window + 1)
        hi = n_past + t1
        sc = np.empty((t1 - t0, hi - lo), np.float32)
        sgemm(True, t1 - t0, hi - lo, hd, scale, qp + 4 * (t0 * ldq + h * hd), ldq,
              kp + 4 * (lo * ldk + kh * hd), ldk, sc.ctypes.data, hi - lo)
        _softmax_rows(sc, t0, t1, n_past, lo, window)
        sgemm(False, t1 - t0, hd, hi - lo, np.float32(1.0), sc.ctypes.data, hi - lo,
              vp + 4 * (lo * ldk + kh * hd), ldk, op + 4 * (t0 * ldq + h * hd), ldq)
