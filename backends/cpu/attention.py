"""Causal grouped-query attention over the float32 KV cache, or in decode its float16 mirror (host_kv.py).
Decode and small batches: attention_dec, per (token, kv head, key block) with every query head of the
GQA group, split over the threads for long contexts (attention_decode writes the cache too, one call;
attention_decode_half the mirror as well; also inside the compiled programs).  Prefill
(from ATT_SGEMM_MIN_TOK query rows): per (head, block of queries) through sgemm + vectorized softmax."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import blas
from .attn_simd import add_values, put_half, score1, scores8
from .attention_paged import _row as paged_row
from .attention_sgemm import ATT_SGEMM_MIN_TOK, attention_sgemm
from .jit import INLINE as _INLINE, PAR, SER as _SER
from .llvm_ir import HAVE_AVX2
from .vmath import vexp

_JIT = PAR


@njit(**_SER)
def attention_serial(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    """Row by row, head by head (the simple kernel: the reference of the tests)."""
    n_tok = q.shape[0]
    g = n_head // n_kv
    sc = np.empty(n_past + n_tok, np.float32)
    acc = np.empty(hd, np.float32)
    one_block = np.zeros((1, 1), np.int64)  # the contiguous cache as one block of the paged row kernel
    for t in range(n_tok):
        for h in range(n_head):
            paged_row(q, kc, vc, one_block, kc.shape[0], 0, n_past + t, g, hd, scale, window, t, h, sc, acc, out)


# Decode attention in parallel (split-K, "flash decoding"): the keys [0, n_past + n_tok) are cut into
# blocks of DEC_BLOCK_BYTES of K per kv head; one work item is (token, kv head, key block) and computes,
# for each query head of its GQA group, the block's max score m, sum of exp(s - m) l and the
# unnormalized sum of exp(s - m) * v; a combine per (token, head) rescales the blocks to the global
# max.  A block's K/V rows are read from memory once for the whole group (the other heads find them in
# L2), and the blocks spread over the threads, so a long context is neither one-thread nor re-read g
# times from DRAM.  Short contexts (below DEC_PAR_MIN) run the same kernels as one block on one thread
# (attention_onepass).
DEC_BLOCK_BYTES = 64 * 1024  # K bytes of one kv head per block (256 keys at head_dim 64)
DEC_SUB_BYTES = 8 * 1024  # K bytes per sub-block: its keys stay in L1 while the group's heads read them
# (token, head, key) triples from which attention_dec uses the threads (SmolLM2 from ~230 keys)
DEC_PAR_MIN = 2048


@njit(**_SER)
def dec_block(hd):
    """Keys per block of the split decode attention."""
    return max(32, DEC_BLOCK_BYTES // (4 * hd))


@njit(**_INLINE)
def _scores(q, qo, kc, kh, c0, c1, scale, sc, so):
    """sc.flat[so + s - c0] = scale * (q.flat[qo : qo + hd] . kc[s, kh]) for keys s in [c0, c1)."""
    hd = kc.shape[2]
    qf = q.reshape(-1)
    sf = sc.reshape(-1)
    s = c0
    if HAVE_AVX2 and hd % 8 == 0:  # 8 keys at a time (attn_simd), the rest below
        n8 = (c1 - c0) // 8
        scores8(q, qo, kc, (c0 * kc.shape[1] + kh) * hd, kc.shape[1] * hd, n8, hd // 8, scale, sc, so)
        s = c0 + 8 * n8
        if kc.itemsize == 2:  # a float16 mirror (uint16 bits): its tail one key at a time (attn_simd)
            for s in range(s, c1):
                score1(q, qo, kc, (s * kc.shape[1] + kh) * hd, hd // 8, scale, sc, so + s - c0)
            return
    while s + 3 < c1:  # 4 keys at a time: 4 independent reductions
        k0 = kc[s, kh]
        k1 = kc[s + 1, kh]
        k2 = kc[s + 2, kh]
        k3 = kc[s + 3, kh]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for d in range(hd):
            x = qf[qo + d]
            a0 += x * k0[d]
            a1 += x * k1[d]
            a2 += x * k2[d]
            a3 += x * k3[d]
        i = so + s - c0
        sf[i] = a0 * scale
        sf[i + 1] = a1 * scale
        sf[i + 2] = a2 * scale
        sf[i + 3] = a3 * scale
        s += 4
    while s < c1:
        k0 = kc[s, kh]
        a0 = np.float32(0.0)
        for d in range(hd):
            a0 += qf[qo + d] * k0[d]
        sf[so + s - c0] = a0 * scale
        s += 1


@njit(**_INLINE)
def _add_values(p, po, vc, kh, c0, c1, acc, ao):
    """acc.flat[ao + d] += sum over keys s in [c0, c1) of p.flat[po + s - c0] * vc[s, kh, d]."""
    hd = vc.shape[2]
    if HAVE_AVX2 and hd % 8 == 0:  # the accumulator in registers (attn_simd)
        add_values(p, po, vc, (c0 * vc.shape[1] + kh) * hd, vc.shape[1] * hd, c1 - c0, hd, acc, ao)
        return
    pf = p.reshape(-1)
    af = acc.reshape(-1)
    s = c0
    while s + 3 < c1:  # 4 value rows per pass over acc
        i = po + s - c0
        p0 = pf[i]
        p1 = pf[i + 1]
        p2 = pf[i + 2]
        p3 = pf[i + 3]
        v0 = vc[s, kh]
        v1 = vc[s + 1, kh]
        v2 = vc[s + 2, kh]
        v3 = vc[s + 3, kh]
        for d in range(hd):
            af[ao + d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]
        s += 4
    while s < c1:
        p0 = pf[po + s - c0]
        v0 = vc[s, kh]
        for d in range(hd):
            af[ao + d] += p0 * v0[d]
        s += 1


@njit(**_SER)
def _attn_dec_block(q, kc, vc, n_past, g, hd, scale, window, t, kh, s0, s1, sc, pm, pl, pacc, b):
    """Keys [s0, s1) (cut to token t's causal / windowed range) for the g query heads of kv head kh:
    pm/pl/pacc[(t, h), b] = block max, sum of exp(s - max), sum of exp(s - max) * v.  sc: (g, s1 - s0).
    The keys go in sub-blocks of ~8 KiB of K (V): the first head reads them from memory, the other
    heads of the group from L1."""
    n_head = q.shape[1] // hd
    pos = n_past + t
    lo = 0
    if window > 0:
        lo = max(0, pos - window + 1)
    a = max(s0, lo)
    e = min(s1, pos + 1)
    r0 = t * n_head + kh * g
    if a >= e:  # empty: no weight in the combine
        for j in range(g):
            pm[r0 + j, b] = np.float32(-3.0e38)
            pl[r0 + j, b] = np.float32(0.0)
            for d in range(hd):
                pacc[r0 + j, b, d] = np.float32(0.0)
        return
    sb = max(8, DEC_SUB_BYTES // (4 * hd))
    n = e - a
    blk = sc.shape[1]
    for c0 in range(a, e, sb):
        c1 = min(e, c0 + sb)
        for j in range(g):
            _scores(q, (t * n_head + kh * g + j) * hd, kc, kh, c0, c1, scale, sc, j * blk + c0 - a)
    for j in range(g):
        row = sc[j]
        mx = row[0]
        for i in range(1, n):
            if row[i] > mx:
                mx = row[i]
        for i in range(n):
            row[i] -= mx
        vexp(row, 0, n)
        tot = np.float32(0.0)
        for i in range(n):
            tot += row[i]
        pm[r0 + j, b] = mx
        pl[r0 + j, b] = tot
        for d in range(hd):
            pacc[r0 + j, b, d] = np.float32(0.0)
    for c0 in range(a, e, sb):
        c1 = min(e, c0 + sb)
        for j in range(g):
            _add_values(sc, j * blk + c0 - a, vc, kh, c0, c1, pacc, ((r0 + j) * pacc.shape[1] + b) * hd)


@njit(**_INLINE)
def _combine(pm, pl, pacc, out, r, n_head, hd):
    """out row r = (token, head): the blocks' partial sums rescaled to the largest block max, / total."""
    t = r // n_head
    h = r % n_head
    nb = pm.shape[1]
    mx = np.float32(-3.0e38)
    for b in range(nb):
        if pl[r, b] != np.float32(0.0) and pm[r, b] > mx:
            mx = pm[r, b]
    o = out[t, h * hd:(h + 1) * hd]
    for d in range(hd):
        o[d] = np.float32(0.0)
    tot = np.float32(0.0)
    for b in range(nb):
        if pl[r, b] == np.float32(0.0):  # empty block (a NaN total is kept: it propagates)
            continue
        w = np.exp(pm[r, b] - mx)
        tot += w * pl[r, b]
        for d in range(hd):
            o[d] += w * pacc[r, b, d]
    inv = np.float32(1.0) / tot
    for d in range(hd):
        o[d] *= inv


@njit(**_JIT)
def attention_split(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out, blk):
    """Decode attention over key blocks of `blk` rows, (token, kv head, block) items over the threads,
    then the combine per (token, head), also over the threads.  Same arguments as attention_serial."""
    n_tok = q.shape[0]
    g = n_head // n_kv
    nb = (n_past + n_tok + blk - 1) // blk
    pm = np.empty((n_tok * n_head, nb), np.float32)
    pl = np.empty((n_tok * n_head, nb), np.float32)
    pacc = np.empty((n_tok * n_head, nb, hd), np.float32)
    for it in prange(n_tok * n_kv * nb):
        b = it % nb  # block-minor: neighbouring items share a head's K/V stream
        kh = (it // nb) % n_kv
        t = it // (nb * n_kv)
        sc = np.empty((g, blk), np.float32)
        _attn_dec_block(q, kc, vc, n_past, g, hd, scale, window, t, kh, b * blk, (b + 1) * blk, sc, pm, pl, pacc, b)
    for r in prange(n_tok * n_head):
        _combine(pm, pl, pacc, out, r, n_head, hd)


@njit(**_SER)
def attention_onepass(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    """attention_split's kernels with one block, on this thread (short contexts)."""
    n_tok = q.shape[0]
    g = n_head // n_kv
    s_max = n_past + n_tok
    pm = np.empty((n_tok * n_head, 1), np.float32)
    pl = np.empty((n_tok * n_head, 1), np.float32)
    pacc = np.empty((n_tok * n_head, 1, hd), np.float32)
    sc = np.empty((g, s_max), np.float32)
    for t in range(n_tok):
        for kh in range(n_kv):
            _attn_dec_block(q, kc, vc, n_past, g, hd, scale, window, t, kh, 0, s_max, sc, pm, pl, pacc, 0)
    for r in range(n_tok * n_head):
        _combine(pm, pl, pacc, out, r, n_head, hd)


@njit(**_SER)
def attention_dec(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    """Decode and small batches: split over key blocks and the threads from DEC_PAR_MIN (token, head,
    key) triples, one pass on this thread below."""
    n_tok = q.shape[0]
    lo = max(0, n_past - window + 1) if window > 0 else 0  # the first token's first key
    if n_tok * n_head * (n_past + n_tok - lo) >= DEC_PAR_MIN:
        attention_split(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out, dec_block(hd))
    else:
        attention_onepass(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out)


@njit(**_INLINE)
def _write_kv(k_new, v_new, kc, vc, n_past):
    """k_new/v_new (n_tok, n_kv*hd; row-strided views allowed) into the float32 caches at n_past."""
    n_kv, hd = kc.shape[1], kc.shape[2]
    for t in range(k_new.shape[0]):
        for kh in range(n_kv):
            for d in range(hd):
                kc[n_past + t, kh, d] = k_new[t, kh * hd + d]
                vc[n_past + t, kh, d] = v_new[t, kh * hd + d]


@njit(**_SER)
def attention_decode(q, k_new, v_new, kc, vc, n_past, n_head, n_kv, hd, scale, window, out):
    """Decode: write k_new/v_new into the caches at n_past, then attention_dec (one call instead of
    two cache writes + attention)."""
    _write_kv(k_new, v_new, kc, vc, n_past)
    attention_dec(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out)


HALF_MAX = 65504.0  # the largest finite float16


@njit(**_INLINE)
def _half_row(src, dst, i):
    """Row i of a float32 cache into its float16 mirror; returns the row's largest |value| (a loop
    LLVM vectorizes: no branch per value)."""
    n = src.shape[1] * src.shape[2]
    sf = src.reshape(-1)
    m = np.float32(0.0)
    for j in range(i * n, (i + 1) * n):
        x = sf[j]
        m = max(m, abs(x))
        put_half(dst, j, x)
    return m


@njit(**_SER)
def _to_half(src, dst, r0, r1):
    """Rows [r0, r1) of a float32 cache into its float16 mirror; False if a value is beyond float16's
    range (a NaN is carried over: it propagates as in float32)."""
    m = np.float32(0.0)
    for i in range(r0, r1):
        m = max(m, _half_row(src, dst, i))
    return not m > HALF_MAX


@njit(**PAR)
def to_half_rows(src, dst, r0, r1):
    """_to_half over the threads: a prompt's rows converted at its end (HostKV.catch_up)."""
    big = np.zeros(max(r1 - r0, 0), np.float32)
    for i in prange(r0, r1):
        big[i - r0] = _half_row(src, dst, i)
    return not (r1 > r0 and big.max() > HALF_MAX)


@njit(**_SER)
def attention_decode_half(q, k_new, v_new, kc, vc, kh, vh, n_half, n_past, n_head, n_kv, hd, scale, window, out):
    """attention_decode reading the float16 mirrors kh / vh (uint16 bits) of the float32 caches kc / vc:
    the new K/V go into kc / vc, then the mirrors' rows [n_half, n_past + n_tok) are converted (the
    new ones, and what a prefill wrote since).  Returns the mirrors' valid row count, or -1 when a
    value is beyond float16's range: this step and the caller's later ones read kc / vc."""
    _write_kv(k_new, v_new, kc, vc, n_past)
    n = n_past + q.shape[0]
    if not (_to_half(kc, kh, min(n_half, n_past), n) and _to_half(vc, vh, min(n_half, n_past), n)):
        attention_dec(q, kc, vc, n_past, n_head, n_kv, hd, scale, window, out)
        return -1
    attention_dec(q, kh, vh, n_past, n_head, n_kv, hd, scale, window, out)
    return n


def attention(q, k_cache, v_cache, n_past, n_head, n_kv, head_dim, scale, window=0, use_blas=None):
    """Causal grouped-query attention of q (n_tok, n_head*head_dim) over cache rows [0, n_past+n_tok)
    of k_cache/v_cache (n_ctx, n_kv, head_dim); window > 0: only the last `window` positions.
    use_blas: sgemm for prefill (None: when numba's threads can call OpenBLAS)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty_like(q)
    args = (q, k_cache, v_cache, int(n_past), int(n_head), int(n_kv), int(head_dim), np.float32(scale),
            int(window or 0), out)
    if use_blas is None:
        use_blas = HAVE_AVX2 and blas.AVAILABLE
    if q.shape[0] >= ATT_SGEMM_MIN_TOK and use_blas \
            and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous \
            and k_cache.dtype == v_cache.dtype == np.float32:
        with blas.one_blas_thread():
            attention_sgemm(*args)
    else:
        attention_dec(*args)
    return out
