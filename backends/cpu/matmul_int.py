"""Quantized matmul with int16 activations: x quantized per 32 values, then one parallel tile driver
for every packed layout. Runs every decode step (mm_dec, also inside the compiled programs) and
batches below GEMM_MIN_TOKENS."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import dot_blk
from .jit import INLINE, PAR, SER as _SER
from .matmul_multi import N_MULTI, tile_blk, tile_nib, tile_nibw, tile_nibw8
from .nib_half import dot_nib5h_row, dot_nibw8_row, dot_nibw_row
from .simd import dot_i8_row, dot_i8s16_row, dot_nib5_row, dot_nib_row

# One driver for all layouts, the layout a number tested once per group of rows: numba compiles it
# once for decode, small batches and programs alike. A driver per layout from a factory closure or a
# first-class function argument would not be cached on disk (numba keys those by a per-process id:
# every start would recompile them).

_JIT = PAR
ROWS = 16  # rows per parallel work item
TT = 64  # tokens per tile: one weight row stays in L1 while it meets a tile of tokens (int16, in L2)

L_NIB, L_NIB5, L_I8, L_I8S16, L_BLK, L_NIBW, L_NIB5H, L_NIBW8 = range(8)
LAYOUT_ID = {"nib": L_NIB, "nib5": L_NIB5, "i8": L_I8, "i8s16": L_I8S16, "blk": L_BLK, "nibw": L_NIBW,
             "nib5h": L_NIB5H}  # L_NIBW8: "nibw" weights with int8 activations (PackedWeight.act8)


# Activation formats (PackedWeight.act_fmt): int16 in x's order, int8 paired (L_NIBW8), int16 paired
# (L_NIBW). "Paired": the blocks of whole groups of 4 (b < nb // 4 * 4) sit two by two so that the
# nibble kernels' 256-bit ops read a pair's operands in one load each (nib_half.row_dots); the
# other blocks (a row's last nb % 4) keep their own order at 32 b.
ACT_I16, ACT_I8P, ACT_I16P = 0, 1, 2


@njit(**INLINE)
def _block_scale(x, t, b, qmax):
    """Block b of row t: (scale amax/qmax, its inverse or 0, z). z is 0, or NaN when the block holds
    a NaN or an inf (x * 0): added to xd and xs it makes the matmul's outputs NaN, not finite garbage."""
    amax = np.float32(0.0)
    z = np.float32(0.0)
    for j in range(32):
        v = x[t, b * 32 + j]
        amax = max(amax, abs(v))
        z += v * np.float32(0.0)
    dd = amax / qmax
    return dd, (np.float32(1.0) / dd if dd > 0 else np.float32(0.0)), z


@njit(**_SER)
def quant_row(x, xq, xd, xs, t, paired=False):
    """Row t of x -> int16 xq, per-32 scale xd = amax/32767 and xs = xd * sum(xq). paired (L_NIBW):
    in a pair (2p, 2p+1) of a whole group of 4, 8-value chunk k of A at 64p + 16k, of B at 64p + 16k + 8."""
    nb = x.shape[1] // 32
    ng4 = nb // 4 * 4 if paired else 0
    for b in range(nb):
        dd, idd, z = _block_scale(x, t, b, np.float32(32767.0))
        s = np.int32(0)
        for j in range(32):
            v = np.int32(np.rint(x[t, b * 32 + j] * idd))
            if b < ng4:
                xq[t, 64 * (b >> 1) + 16 * (j >> 3) + 8 * (b & 1) + (j & 7)] = v
            else:
                xq[t, b * 32 + j] = v
            s += v
        xd[t, b] = dd + z
        xs[t, b] = dd * np.float32(s) + z


@njit(**_SER)
def quant_row8(x, xq, xd, xs, t):
    """quant_row to int8 (xd = amax/127), for L_NIBW8, in the first half of xq's row t (xq[t].view(int8)).
    A block's 32 bytes are in the order of the nibw weights' bytes (llvm_ir.byte_nibbles): 0, 16, 1, 17,
    .., 7, 23 (its first 16), then 8, 24, .., 15, 31. Paired: in a pair (2p, 2p+1) of a whole group of 4,
    at bytes 64p: A's first 16, B's first 16, A's second 16, B's second 16."""
    nb = x.shape[1] // 32
    ng4 = nb // 4 * 4
    q8 = xq[t].view(np.int8)
    for b in range(nb):
        dd, idd, z = _block_scale(x, t, b, np.float32(127.0))
        s = np.int32(0)
        for j in range(32):
            k = j & 15
            v = np.int32(np.rint(x[t, b * 32 + (k >> 1) + 16 * (k & 1) + 8 * (j >> 4)] * idd))
            if b < ng4:
                q8[64 * (b >> 1) + 32 * (j >> 4) + 16 * (b & 1) + k] = v
            else:
                q8[b * 32 + j] = v
            s += v
        xd[t, b] = dd + z
        xs[t, b] = dd * np.float32(s) + z


@njit(**INLINE)
def quant_row_as(x, xq, xd, xs, t, fmt):
    if fmt == ACT_I8P:
        quant_row8(x, xq, xd, xs, t)
    else:
        quant_row(x, xq, xd, xs, t, fmt == ACT_I16P)


@njit(**INLINE)
def act_fmt_of(layout_id):
    """The activation format a kernel layout reads (mm_dec, and PackedWeight.act_fmt from Python)."""
    return ACT_I8P if layout_id == L_NIBW8 else ACT_I16P if layout_id == L_NIBW else ACT_I16


@njit(**_JIT)
def quant_x(x, xq, xd, xs, fmt=0):
    """x (n_tok, n) float32 -> xq int16 (n_tok, n), xd scale and xs = xd*sum(xq) (n_tok, n/32), in
    activation format fmt (ACT_*: int16, int8 paired for L_NIBW8, int16 paired for L_NIBW)."""
    for t in prange(x.shape[0]):
        quant_row_as(x, xq, xd, xs, t, fmt)


@njit(**INLINE)
def _m_term(v, has_m, m, xst, r, nb):
    """v + the row's m . xs; m: float32 scales as bytes."""
    if has_m:
        mf = m.view(np.float32)
        for b in range(nb):
            v += mf[r * nb + b] * xst[b]
    return v


# The row loops of each layout are functions of their own (compiled apart, called once per group of
# rows), not inlined into one driver with every layout's loop: inlined, SmolLM2's decode rows (18
# blocks) ran ~20% slower (o_proj: 4.1 against 3.3 ns per block, one thread, same code in the hot
# loop; the row loop around it had its values spilled to the stack).  Below N_MULTI tokens the token
# loop is outside: one token's rows in one loop, its activation rows looked up once.


@njit(**_SER)
def _rows_nibw(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, mmul, out):
    if t1 - t0 >= N_MULTI:  # a few tokens: 4 per pass over a row (matmul_multi)
        tile_nibw(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, mmul, out)
        return
    for t in range(t0, t1):
        xqt, xdt, xst, ot = xq[t], xd[t], xs[t], out[t]
        for r in range(r0, r1):
            ot[r] = dot_nibw_row(qs, d, m, xqt, xdt, xst, (r * nb, nb), mmul)


@njit(**_SER)
def _rows_nibw8(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, mmul, out):
    if t1 - t0 >= N_MULTI:
        tile_nibw8(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, mmul, out)
        return
    for t in range(t0, t1):
        xqt, xdt, xst, ot = xq[t], xd[t], xs[t], out[t]
        for r in range(r0, r1):
            ot[r] = dot_nibw8_row(qs, d, m, xqt, xdt, xst, (r * nb, nb), mmul)


@njit(**_SER)
def _rows_nib5h(qs, qh, d, m, xq, xd, xs, nb, r0, r1, t0, t1, mmul, out):
    for t in range(t0, t1):
        xqt, xdt, xst, ot = xq[t], xd[t], xs[t], out[t]
        for r in range(r0, r1):
            ot[r] = dot_nib5h_row(qs, qh, d, m, xqt, xdt, xst, (r * nb, nb), mmul)


@njit(**_SER)
def _rows_nib(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, out):
    if t1 - t0 >= N_MULTI:
        tile_nib(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, out)
        return
    for t in range(t0, t1):
        xqt, xdt, xst, ot = xq[t], xd[t], xs[t], out[t]
        for r in range(r0, r1):
            ot[r] = dot_nib_row(qs, d, m, xqt, xdt, xst, (r * nb, nb))


@njit(**_SER)
def _rows_nib5(qs, qh, d, m, xq, xd, xs, nb, r0, r1, t0, t1, out):
    for t in range(t0, t1):
        xqt, xdt, xst, ot = xq[t], xd[t], xs[t], out[t]
        for r in range(r0, r1):
            ot[r] = dot_nib5_row(qs, qh, d, m, xqt, xdt, xst, (r * nb, nb))


@njit(**_SER)
def _rows_blk(fmt, qs, xq, xd, xs, nb, r0, r1, t0, t1, out):
    if t1 - t0 >= N_MULTI:
        tile_blk(fmt, qs, xq, xd, xs, nb, r0, r1, t0, t1, out)
        return
    for t in range(t0, t1):
        xqt, xdt, xst, ot = xq[t], xd[t], xs[t], out[t]
        for r in range(r0, r1):
            ot[r] = dot_blk(fmt, qs, xqt, xdt, xst, (r * nb, nb))


@njit(**_SER)
def _rows_i8(s16, has_m, qi, d, m, xq, xd, xs, nb, r0, r1, t0, t1, out):
    """L_I8 (s16 False) and L_I8S16 rows."""
    for t in range(t0, t1):
        xqt, xdt, xst, ot = xq[t], xd[t], xs[t], out[t]
        for r in range(r0, r1):
            if s16:
                v = dot_i8s16_row(qi, d, xqt, xdt, (r * nb, nb))
            else:
                v = dot_i8_row(qi, d, xqt, xdt, (r * nb, nb))
            ot[r] = _m_term(v, has_m, m, xst, r, nb)


@njit(**INLINE)
def _tile(layout, fmt, nb, has_m, qs, qi, qh, d, m, xq, xd, xs, r0, r1, t0, t1, out):
    """out[t0:t1, r0:r1]: one loop per layout, so the layout test stays out of the row loop. d, m:
    the scales as bytes (float32, or float16 for L_NIBW / L_NIB5H, where fmt is m's multiplier)."""
    if layout == L_NIBW:
        _rows_nibw(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, np.float32(fmt), out)
    elif layout == L_NIBW8:
        _rows_nibw8(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, np.float32(fmt), out)
    elif layout == L_NIB5H:
        _rows_nib5h(qs, qh, d, m, xq, xd, xs, nb, r0, r1, t0, t1, np.float32(fmt), out)
    elif layout == L_NIB:
        _rows_nib(qs, d, m, xq, xd, xs, nb, r0, r1, t0, t1, out)
    elif layout == L_NIB5:
        _rows_nib5(qs, qh, d, m, xq, xd, xs, nb, r0, r1, t0, t1, out)
    elif layout == L_BLK:
        _rows_blk(fmt, qs, xq, xd, xs, nb, r0, r1, t0, t1, out)
    else:
        _rows_i8(layout == L_I8S16, has_m, qi, d, m, xq, xd, xs, nb, r0, r1, t0, t1, out)


@njit(**_JIT)
def mm_int(wk, qs, qh, d, m, xq, xd, xs, out):
    """out (n_tok, n_rows) = x @ W^T from the quantized activations (xq, xd, xs), for every layout;
    wk, qs, qh, d, m: PackedWeight.kernel_args(). prange over groups of ROWS rows, then tiles of TT
    tokens, then rows, then tokens."""
    layout, fmt, nb, has_m = wk[0], wk[1], wk[2], wk[3] != 0
    n_tok = xq.shape[0]
    qi = qs.view(np.int8)
    n_rows = out.shape[1]
    n_groups = (n_rows + ROWS - 1) // ROWS
    for g in prange(n_groups):
        r0, r1 = g * ROWS, min(n_rows, (g + 1) * ROWS)
        for t0 in range(0, n_tok, TT):
            _tile(layout, fmt, nb, has_m, qs, qi, qh, d, m, xq, xd, xs, r0, r1, t0, min(n_tok, t0 + TT), out)


@njit(**_SER)
def mm_dec(wk, qs, qh, d, m, x, xq, xd, xs, out):
    """Decode: quantize x's few rows here, serially, then mm_int (one dispatch and one thread-pool
    launch per matmul, not two)."""
    fmt = act_fmt_of(wk[0])
    for t in range(xq.shape[0]):
        quant_row_as(x, xq, xd, xs, t, fmt)
    mm_int(wk, qs, qh, d, m, xq, xd, xs, out)
