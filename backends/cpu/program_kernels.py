"""The numba side of a compiled decode program (program.py): one call interprets a whole run of a
decode step's nodes with the op-by-op kernels, one Python -> numba transition instead of ~15 per layer."""
from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic

from . import ops as O
from .attention import attention_decode, attention_decode_half
from .attention_paged import PAGED_PAR_MIN, paged_parallel, paged_serial
from .jit import INLINE, SER as _SER
from .matmul_int import mm_dec

# A program is an int64 table, one row per instruction:
#     [op, out buf, out c0, out c1, a buf, a c0, a c1, b buf, b c0, b c1, c buf, c c0, c c1, p0 .. p6]
# and one float32 row of parameters.  Operands are column ranges of 2-D float32 buffers (the siblings
# of a stacked q|k|v or gate|up matmul are column ranges of its output).  The kernels are the ones
# the op-by-op path calls, so both paths compute the same numbers.
#
# The arrays (buffers, weights, vectors, K/V caches, activation buffers) come as int64 tables, one row
# per array: [address, shape...] (program.py's _table), rebuilt here with carray.  numba typed Lists
# of arrays instead compiled their methods in every new process (~4 s before the first token).

OP_NORM, OP_NORM_HEADS, OP_MM, OP_BIAS, OP_ADD, OP_ACT, OP_SCALE, OP_ROPE, OP_ATTN, OP_COPY, OP_PATTN = range(11)
N_COLS = 20
P0 = 13
F32, U8, U16, U32, I16, I64 = np.float32, np.uint8, np.uint16, np.uint32, np.int16, np.int64


@intrinsic
def _ptr(typingctx, addr, dtype):
    """int64 address -> pointer to dtype (dtype: a numpy scalar type such as np.float32)."""
    if not isinstance(addr, types.Integer) or not isinstance(dtype, types.NumberClass):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return types.CPointer(dtype.dtype)(addr, dtype), codegen


@njit(**INLINE)
def _a1(tab, i, dt):
    return carray(_ptr(tab[i, 0], dt), (tab[i, 1],))


@njit(**INLINE)
def _a2(tab, i, dt):
    return carray(_ptr(tab[i, 0], dt), (tab[i, 1], tab[i, 2]))


@njit(**INLINE)
def _a3(tab, i, dt):
    return carray(_ptr(tab[i, 0], dt), (tab[i, 1], tab[i, 2], tab[i, 3]))


@njit(**_SER)
def _norm_heads(x, w, hd, eps, out):
    """rms_norm of every head_dim-wide group of x's columns (x may be a column range)."""
    n_tok, n = x.shape
    for t in range(n_tok):
        for h0 in range(0, n, hd):
            ss = np.float32(0.0)
            for i in range(hd):
                v = x[t, h0 + i]
                ss += v * v
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(hd) + eps)
            for i in range(hd):
                out[t, h0 + i] = x[t, h0 + i] * inv * w[i]


@njit(**_SER)
def run(code, fpar, bufs, wk, wq, wh, wd, wm, vec, kc, vc, kh, vh, nh, half_from, cos, sin, n_past, xq, xd, xs, slots,
        seq, pos, tables, bs):
    for i in range(code.shape[0]):
        c = code[i]
        op = c[0]
        out = _a2(bufs, c[1], F32)[:, c[2]:c[3]]
        a = _a2(bufs, c[4], F32)[:, c[5]:c[6]]
        p = c[P0:]
        if op == OP_MM:
            j = p[1]  # activation quantization buffers for this (rows, n_cols)
            w = p[0]
            mm_dec(wk[w], _a1(wq, w, U8), _a1(wh, w, U32), _a1(wd, w, U8), _a1(wm, w, U8), _a2(bufs, c[4], F32),
                   _a2(xq, j, I16), _a2(xd, j, F32), _a2(xs, j, F32), _a2(bufs, c[1], F32))
        elif op == OP_NORM:  # its input is a whole buffer (C layout: the sum vectorizes as op by op)
            x = _a2(bufs, c[4], F32)
            if p[1] != 0:  # only the last row (the logits of the last token)
                x = x[x.shape[0] - 1:]
            # out: its whole buffer (C layout): the column-range view compiled another kernel, whose
            # products rounded 1 ulp apart from op by op's (a token of a batch then moved)
            O.rms_norm_serial(x, _a1(vec, p[0], F32), fpar[i, 0], _a2(bufs, c[1], F32))
        elif op == OP_NORM_HEADS:
            _norm_heads(a, _a1(vec, p[0], F32), p[1], fpar[i, 0], out)
        elif op == OP_BIAS:
            v = _a1(vec, p[0], F32)
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] += v[k]
        elif op == OP_ADD:
            b = _a2(bufs, c[7], F32)[:, c[8]:c[9]]
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] = a[t, k] + b[t, k]
        elif op == OP_ACT:
            b = _a2(bufs, c[7], F32)[:, c[8]:c[9]]
            O.act_serial(p[0], a, b, True, out)
        elif op == OP_SCALE:
            s = fpar[i, 0]
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] = a[t, k] * s
        elif op == OP_ROPE:
            o = _a2(bufs, c[1], F32)
            o3 = o.reshape(o.shape[0], p[1], p[2])
            O.rope_out_serial(a, o3, cos[p[0]], sin[p[0]], p[3], p[4] != 0)
        elif op == OP_ATTN:
            b = _a2(bufs, c[7], F32)[:, c[8]:c[9]]
            v = _a2(bufs, c[10], F32)[:, c[11]:c[12]]
            # q: a whole buffer (C layout, as op by op).  One thread, as op by op: spreading the heads
            # over 2 threads measured no faster (21.2 vs 22.1 ms/token at 1500 tokens) and compiles
            # another parallel kernel (~1.7 s cold)
            n_half = _a1(nh, p[0], I64)  # (the layer's float16 mirror: host_kv.py)
            if n_half[0] >= 0 and n_past >= half_from:
                n_half[0] = attention_decode_half(_a2(bufs, c[4], F32), b, v, _a3(kc, p[0], F32), _a3(vc, p[0], F32),
                                                  _a3(kh, p[0], U16), _a3(vh, p[0], U16), n_half[0], n_past,
                                                  p[1], p[2], p[3], fpar[i, 0], p[4], _a2(bufs, c[1], F32))
            else:
                attention_decode(_a2(bufs, c[4], F32), b, v, _a3(kc, p[0], F32), _a3(vc, p[0], F32), n_past,
                                 p[1], p[2], p[3], fpar[i, 0], p[4], _a2(bufs, c[1], F32))
        elif op == OP_PATTN:  # several sequences (continuous batching): the paged kernels op by op calls
            b = _a2(bufs, c[7], F32)[:, c[8]:c[9]]
            v = _a2(bufs, c[10], F32)[:, c[11]:c[12]]
            q = _a2(bufs, c[4], F32)
            fn_args = (q, b, v, _a3(kc, p[0], F32), _a3(vc, p[0], F32), slots, seq, pos, tables, bs, p[1], p[2], p[3],
                       fpar[i, 0], p[4], _a2(bufs, c[1], F32))
            if q.shape[0] * p[1] >= PAGED_PAR_MIN:
                paged_parallel(*fn_args)
            else:
                paged_serial(*fn_args)
        elif op == OP_COPY:
            for t in range(out.shape[0]):
                for k in range(out.shape[1]):
                    out[t, k] = a[t, k]
