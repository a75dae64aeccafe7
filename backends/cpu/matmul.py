"""x @ W^T for a PackedWeight: picks the kernel by batch size and layout. Decode (a few tokens):
matmul_int.mm_dec; below GEMM_MIN_TOKENS: int16 activations (matmul_int); from it: dequantized tiles +
sgemm from numba's threads (matmul_blas); float weights: sgemm or numpy."""
from __future__ import annotations

import time

import numba
import numpy as np

from ...core.batch import GEMM_MIN_TOKENS, is_small_batch
from ...core.qtypes import QType
from . import blas, blocks, dequant, matmul_blas, matmul_int
from .llvm_ir import HAVE_AVX2
from .weights import HALF_LAYOUTS, PackedWeight

# numba's threads can call numpy's OpenBLAS here (the backend may still turn it off: Options.blas_prefill)
BLAS_USABLE = HAVE_AVX2 and blas.AVAILABLE
NEVER = 1 << 62  # gemm_min_tokens that keeps every batch on the int16 kernels
# From GEMM_MIN_TOKENS tokens, quantized matmuls dequantize tiles of rows and call float32 sgemm
# (matmul_blas: numba's threads each call numpy's OpenBLAS single-threaded on their rows; ~80 G
# weight*tokens/s on 2 threads vs 25-45 for the int16 kernels at 512 tokens; measured crossover
# 16-32 tokens).  Calling numpy's multi-threaded matmul between numba kernels instead collapses
# both pools (spinning, tools/kernel_notes.md), hence _matmul_tiles is only the fallback.
# tools/accuracy_check passes 1 for its reference path (dequantize + float32 sgemm everywhere).
_TILE_ELEMS = 1 << 18  # float32 elements per dequantized tile (1 MiB)
# float32 weights per thread's dequantized tile, chosen per weight shape and token count by timing
# each once at first use (_blas_tile): on this repository's 2-core EPYC (512 KiB L2 per core)
# SmolLM2's pp512 ran 90 t/s with 512 KiB tiles and 190-210 with 64 KiB, Gemma 3 the other way
# round (205-217 with 64 KiB, 251-268 with 512 KiB).
_BLAS_TILE_CANDIDATES = (1 << 12, 1 << 14, 1 << 15, 1 << 17)
_BLAS_TILE: dict[tuple, int] = {}  # (layout, qtype, n_rows, n_cols, token bucket) -> rows per tile
_EMPTY_U8 = np.zeros(0, dtype=np.uint8)
_EMPTY_U32 = np.zeros(1, dtype=np.uint32)
_EMPTY_F32 = np.zeros(1, dtype=np.float32)
_EMPTY_F32_2D = np.zeros((1, 1), dtype=np.float32)
_SCALES0 = np.zeros(4, dtype=np.uint8)  # no scales (the kernels take them as bytes)
_NO_QH = np.zeros(1, dtype=np.uint32)
for _a in (_SCALES0, _NO_QH):  # read-only like kernel_args' arrays: one compiled mm_deq_sgemm for both
    _a.setflags(write=False)
_ONE = np.float32(1.0)


def matmul(w: PackedWeight, x: np.ndarray, out: np.ndarray | None = None, use_blas: bool = BLAS_USABLE,
           gemm_min_tokens: int | None = None) -> np.ndarray:
    """x (n_tok, n_cols) @ W^T -> (n_tok, n_rows) float32. use_blas: sgemm from numba's threads for
    prefill and F32 weights (else numpy); gemm_min_tokens: from this many tokens quantized weights go
    through dequantized tiles + sgemm (None: GEMM_MIN_TOKENS with BLAS, else never)."""
    if gemm_min_tokens is None:
        gemm_min_tokens = GEMM_MIN_TOKENS if use_blas else NEVER
    if out is None and x.ndim == 2 and x.shape[0] == 1 and x.dtype == np.float32 and x.flags.c_contiguous \
            and w.layout != "float" and gemm_min_tokens > 1 and x.shape[1] == w.n_cols:
        return w.matvec1(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    x2 = x.reshape(-1, w.n_cols)
    n_tok = x2.shape[0]
    if out is None:
        out = np.empty((n_tok, w.n_rows), dtype=np.float32)
    o2 = out.reshape(n_tok, w.n_rows)
    if n_tok == 0:
        return out
    if w.layout == "float":
        if w.qtype == QType.F32:
            if use_blas and o2.flags.c_contiguous and w.raw.flags.c_contiguous and w.raw.dtype == np.float32:
                with blas.one_blas_thread():
                    matmul_blas.mm_deq_sgemm(matmul_blas.F32, _EMPTY_U8, _NO_QH, _SCALES0, _SCALES0, _ONE,
                                             w.raw, x2, o2, 0, numba.get_num_threads())
            else:
                np.matmul(x2, w.raw.T, out=o2)
            return out
        rows = max(1, _TILE_ELEMS // w.n_cols)
        for r0 in range(0, w.n_rows, rows):
            r1 = min(w.n_rows, r0 + rows)
            tile = dequant.dequantize(w.qtype, w.raw[r0:r1], w.n_cols)
            o2[:, r0:r1] = x2 @ tile.T
        return out
    nb = w.n_cols // 32
    if n_tok >= gemm_min_tokens:
        if use_blas and w.layout in matmul_blas.LAYOUT_CODE and (w.m is None or w.layout not in ("i8", "i8s16")):
            _matmul_blas(w, x2, o2)
        else:
            _matmul_tiles(w, x2, o2, nb)
        return out
    xq = np.empty((n_tok, w.n_cols), dtype=np.int16)
    xd = np.empty((n_tok, nb), dtype=np.float32)
    xs = np.empty((n_tok, nb), dtype=np.float32)
    dst = o2 if o2.flags.c_contiguous else np.empty((n_tok, w.n_rows), dtype=np.float32)
    if is_small_batch(n_tok):  # decode: x quantized inside the call
        matmul_int.mm_dec(*w.kernel_args(), x2, xq, xd, xs, dst)
    else:
        matmul_int.quant_x(x2, xq, xd, xs, w.act_fmt)
        matmul_int.mm_int(*w.kernel_args(), xq, xd, xs, dst)
    if dst is not o2:
        o2[...] = dst
    return out



def _matmul_blas(w: PackedWeight, x2: np.ndarray, o2: np.ndarray) -> None:
    dst = o2 if o2.flags.c_contiguous else np.empty(o2.shape, dtype=np.float32)
    wk, qs, qh, d, m = w.kernel_args()  # the scales as bytes
    layout, mmul = matmul_blas.LAYOUT_CODE[w.layout], _ONE
    if w.layout == "blk":
        layout += blocks.FMT_ID[blocks.QTYPES[w.qtype]]
    elif w.layout in HALF_LAYOUTS:  # fp16 scales, wk[1]: m's multiplier
        mmul = np.float32(wk[1])

    def run(tile: int) -> None:
        with blas.one_blas_thread():
            matmul_blas.mm_deq_sgemm(layout, w.qs, qh, d, m, mmul, _EMPTY_F32_2D, x2, dst, tile,
                                     numba.get_num_threads())

    key = (w.layout, w.qtype, w.n_rows, w.n_cols, 1 << (x2.shape[0] - 1).bit_length())
    tile = _BLAS_TILE.get(key)
    if tile is None:
        tile = _BLAS_TILE[key] = _blas_tile(w.n_cols, run)
    run(tile)  # (again after the trials: OpenBLAS rounds differently per tile width, by ~1e-7)
    if dst is not o2:
        o2[...] = dst


def _blas_tile(n_cols: int, run) -> int:
    """Rows per tile for this weight: each candidate run once on the real inputs (the first also
    once before, to warm up), the fastest kept. The result's last bits depend on it (sgemm's
    blocking), so a process keeps one tile per shape from then on."""
    rows = sorted({max(16, min(256, e // n_cols)) for e in _BLAS_TILE_CANDIDATES})
    run(rows[0])
    times = {}
    for r in rows:
        t0 = time.perf_counter()
        run(r)
        times[r] = time.perf_counter() - t0
    return min(times, key=times.get)


def _matmul_tiles(w: PackedWeight, x2: np.ndarray, o2: np.ndarray, nb: int) -> None:
    rows = max(16, _TILE_ELEMS // w.n_cols)
    buf = np.empty((min(rows, w.n_rows), w.n_cols), dtype=np.float32)
    scales = None
    for r0 in range(0, w.n_rows, rows):
        r1 = min(w.n_rows, r0 + rows)
        tile = buf[:r1 - r0]
        if w.layout == "blk":
            tile[...] = dequant.dequantize(w.qtype, w.qs.reshape(w.n_rows, -1)[r0:r1], w.n_cols)
        elif w.layout in ("nib", "nib5", "nibw", "nib5h"):
            has_h = w.layout in ("nib5", "nib5h")
            if scales is None:
                scales = w.scales_f32()  # float32, m computed for Q4_0/Q5_0: what deq_nib reads
            dequant.deq_nib(w.qs, w.qh if has_h else _EMPTY_U32, has_h, w.layout == "nibw", *scales, r0, r1, nb,
                            tile)
        else:
            has_m = w.m is not None
            dequant.deq_i8(w.qs, w.d, w.layout == "i8s16", w.m if has_m else _EMPTY_F32, has_m, r0, r1, nb, tile)
        np.matmul(x2, tile.T, out=o2[:, r0:r1])

