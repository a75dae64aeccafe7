"""Benchmark the CPU quantized matmul kernels.

    PYTHONPATH=<dir holding lstream> python -m lstream.tools.bench_kernels [--types Q4_1,Q8_0] [--threads 2]

Times matvec (n_tok=1) and matmul (n_tok=512) per type on realistic shapes (n_rows x n_cols):
576x1536, 1536x576, 49152x576, 4096x4096, 14336x4096.  Prints G weights/s (n_rows*n_cols*n_tok / s)
and GB/s of packed weights read per call.  Warm-up calls are discarded; the median of repeats is reported.
The layout column is the packed layout (blk = GGUF blocks in place); the mm path is "sgemm" (dequantized
tiles + OpenBLAS from numba's threads, backends/cpu/matmul_blas) from core.batch.GEMM_MIN_TOKENS tokens, else "int16".
--int16 forces the int16 kernels for the matmul column too.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lstream.backends.cpu import matmul as mm
from lstream.backends.cpu import weights
from lstream.backends.cpu.threads import set_threads
from lstream.core.batch import GEMM_MIN_TOKENS
from lstream.core.qtypes import QTYPE_INFO, QType

SHAPES = [(576, 1536), (1536, 576), (49152, 576), (4096, 4096), (14336, 4096)]
TYPES = ["Q4_1", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "F32", "F16", "BF16"]
# fp16 scale fields (byte offsets) that random blocks must hold sane values in
_FP16 = {QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2), QType.Q8_0: (0,),
         QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,)}


def make_raw(qtype: QType, n_rows: int, n_cols: int, rng) -> np.ndarray:
    if qtype == QType.F32:
        return rng.standard_normal((n_rows, n_cols), dtype=np.float32)
    if qtype == QType.F16:
        return rng.standard_normal((n_rows, n_cols), dtype=np.float32).astype(np.float16)
    if qtype == QType.BF16:
        return (rng.standard_normal((n_rows, n_cols), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    info = QTYPE_INFO[qtype]
    nb = n_rows * n_cols // info.block_size
    blocks = rng.integers(0, 256, size=(nb, info.type_size), dtype=np.uint8)
    for off in _FP16[qtype]:
        blocks[:, off:off + 2] = (rng.uniform(1e-3, 1e-2, nb).astype(np.float16)).view(np.uint8).reshape(nb, 2)
    return blocks.reshape(n_rows, -1)


def bench(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ntok", type=int, default=512, help="tokens for the matmul (prefill) measurement")
    ap.add_argument("--mm-max-weights", type=float, default=2e7,
                    help="skip the n_tok matmul on shapes with more weights than this (time)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--int16", action="store_true", help="matmul column through the int16 kernels")
    args = ap.parse_args()
    set_threads(args.threads)
    gemm_min = mm.NEVER if args.int16 or not mm.BLAS_USABLE else GEMM_MIN_TOKENS
    path = "int16" if args.ntok < gemm_min else "sgemm"
    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"threads={args.threads}  (G w/s = 1e9 weights*tokens per second; GB/s = packed bytes read per call)")
    print(f"{'type':6} {'shape':>11} {'layout':>6} {'bytes/w':>7} | {'matvec G w/s':>12} {'GB/s':>6} {'us':>8} | "
          f"{'mm' + str(args.ntok) + ' G w/s':>12} {'ms':>8}  ({path})")
    for tname in args.types.split(","):
        qtype = QType[tname]
        for n_rows, n_cols in shapes:
            if n_cols % QTYPE_INFO[qtype].block_size:
                continue  # e.g. 576 columns are not a whole number of 256-value K-quant blocks
            raw = make_raw(qtype, n_rows, n_cols, rng)
            w = weights.pack(qtype, raw, n_rows, n_cols)
            del raw
            x1 = rng.standard_normal((1, n_cols), dtype=np.float32)
            o1 = np.empty((1, n_rows), dtype=np.float32)
            t1 = bench(lambda: mm.matmul(w, x1, o1, gemm_min_tokens=gemm_min), args.repeats)
            nw = n_rows * n_cols
            line = (f"{tname:6} {n_rows:>5}x{n_cols:<5} {w.layout:>6} {w.nbytes / nw:7.3f} | {nw / t1 / 1e9:12.2f} "
                    f"{w.nbytes / t1 / 1e9:6.1f} {t1 * 1e6:8.0f} | ")
            if nw <= args.mm_max_weights:
                xn = rng.standard_normal((args.ntok, n_cols), dtype=np.float32)
                on = np.empty((args.ntok, n_rows), dtype=np.float32)
                tn = bench(lambda: mm.matmul(w, xn, on, gemm_min_tokens=gemm_min), max(3, args.repeats // 5), warmup=1)
                line += f"{nw * args.ntok / tn / 1e9:12.2f} {tn * 1e3:8.1f}"
            else:
                line += f"{'-':>12} {'-':>8}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
