"""Benchmark the quantized GEMV kernels (backends/cuda/gemv.py) against dequantize + cuBLAS.

    python -m lstream.tools.bench_gemv [--types Q4_0,Q8_0] [--shapes 4096x4096] [--batch 1,8]
                                       [--dtype fp16] [--sweep] [--json out.json]

Per type, shape (N rows x K cols) and batch: the kernel's time, its effective bandwidth (quantized
bytes of W / time: x and y are tiny) and the time of the path it replaces (cuda.dequant.dequantize
to fp16 into a scratch buffer, then x @ W^T in cuBLAS).

Honest timing: each measurement is a CUDA graph of back-to-back calls (no Python launch cost in
the numbers, the way decode runs captured), timed with CUDA events, median of --reps replays after
a warm-up replay. The calls cycle through enough copies of W (>= 256 MB) that W never sits in the
50 MB L2 the way it cannot in real decode (every layer's weights are read once per token).
--sweep times every candidate config of _candidates() and prints the best few (for tuning config()).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from types import SimpleNamespace
from pathlib import Path

import torch

try:
    from lstream.backends.cuda import gemv as cg
    from lstream.backends.cuda import dequant as ck
    from lstream.backends.cuda import gemv_q8, repack, selfcheck
    from lstream.core.qtypes import QTYPE_INFO, QType
    from lstream.tools.synth_model import _SCALES
except ImportError:  # pragma: no cover - run as a plain script from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lstream.backends.cuda import gemv as cg
    from lstream.backends.cuda import dequant as ck
    from lstream.backends.cuda import gemv_q8, repack, selfcheck
    from lstream.core.qtypes import QTYPE_INFO, QType
    from lstream.tools.synth_model import _SCALES

# Llama-3-8B: q/o, k/v, gate/up, down, output head
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ROTATE_BYTES = 256e6


def random_blocks(qt: QType, n_rows: int, n_cols: int) -> torch.Tensor:
    """Random GGUF blocks on the GPU with sane fp16 scale fields (as tools/synth_model writes them)."""
    info = QTYPE_INFO[qt]
    nb = n_rows * n_cols // info.block_size
    blocks = torch.randint(0, 256, (nb, info.type_size), dtype=torch.uint8, device="cuda")
    for off, mag in _SCALES[qt]:
        s = (mag * (0.5 + torch.rand(nb, device="cuda"))).half()
        blocks[:, off:off + 2] = s.view(torch.uint8).view(nb, 2)
    return blocks.view(n_rows, -1)


def time_calls(calls, reps: int) -> float:
    """Median seconds per call over `reps` replays of a CUDA graph of all `calls`."""
    return statistics.median(selfcheck.graph_times(calls, reps))


def _candidates(qt: QType, n_rows: int, batch: int, bn=(1, 2, 4, 8), ti=(16, 8, 4, 2), nw=(2, 4, 8),
                mult=(1, 2)) -> list[tuple[int, int, int, int]]:
    """(BN, KB, TI, num_warps) variants around config(): TI threads per group and num_warps set
    how many groups a step covers (KB*4 for K-quants must be >= 32/TI*num_warps to avoid replication)."""
    words = {QType.Q8_0: 16, QType.Q6_K: 8}.get(qt, 16 if QTYPE_INFO[qt].block_size == 256 else 8)
    per_block = 4 if QTYPE_INFO[qt].block_size == 256 else 1
    return [(r, max(1, 32 // t * w * m // per_block), t, w) for t in ti if t <= words for w in nw for m in mult
            for r in bn if r * batch <= 64 and n_rows >= r * 132]


def gemv_q8_config(n: int, k: int, qt: QType, batch: int):
    from lstream.backends.cuda import gemv_q8_gluon
    return gemv_q8_gluon.config(SimpleNamespace(n_rows=n, n_cols=k), batch)


def time_q8(copies, qt: QType, x: torch.Tensor, n: int, k: int, ncalls: int, reps: int, sweep=False):
    """The int8 GEMV (gemv_q8) on the same weights repacked, timed the same way; with sweep, also
    every (BN, KB, num_warps) with one or two 32-value blocks per thread: [(seconds, cfg)], best first."""
    packs = [repack.repack(c, qt, n, k) for c in copies]
    y = torch.empty(x.shape[0], n, device="cuda")

    def t(cfg):
        return time_calls([(lambda p=packs[i % len(packs)]: gemv_q8.gemv(x, p, out=y, cfg=cfg))
                           for i in range(ncalls)], reps)
    cands = [(bn, kb, nw) for nw in (1, 2, 4, 8) for kb in (32 * nw, 64 * nw) if (k // 32) % kb == 0
             for bn in (1, 2, 4, 8, 16) if n // bn >= 132] if sweep else []
    return t(None), sorted((t(c), c) for c in cands)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--batch", default="1")
    ap.add_argument("--dtype", default="fp16", choices=DTYPES)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="time every candidate config, print the best")
    ap.add_argument("--cand", default="", help='limit the sweep, e.g. "bn=4,8 ti=2,4 nw=4 mult=1"')
    ap.add_argument("--no-ref", action="store_true", help="skip dequantize + cuBLAS")
    ap.add_argument("--q8", action="store_true",
                    help="also time the int8 GEMV on repacked rows (gemv_q8) for the 32-weight-block types")
    ap.add_argument("--q8-sweep", action="store_true", help="with --q8: time every int8 GEMV config too")
    ap.add_argument("--json", help="write all results here")
    return ap.parse_args()


def main() -> None:
    args = _args()
    import triton
    dtype = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  x {args.dtype}")
    print(f"{'type':5} {'N x K':>13} {'B':>2} {'MB':>7} | {'gemv us':>8} {'GB/s':>6} {'config':>15} | "
          f"{'deq+cuBLAS us':>13} {'speedup':>7} | {'nmse':>7}")
    results = []
    for tname in args.types.split(","):
        qt = QType[tname]
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            nbytes = n * k // QTYPE_INFO[qt].block_size * QTYPE_INFO[qt].type_size
            copies = [random_blocks(qt, n, k) for _ in range(max(1, math.ceil(ROTATE_BYTES / nbytes)))]
            ncalls = max(len(copies), 8)
            for batch in (int(b) for b in args.batch.split(",")):
                x = torch.randn(batch, k, device="cuda").to(dtype)
                y = torch.empty(batch, n, device="cuda", dtype=dtype)
                calls = lambda cfg: [  # noqa: E731
                    (lambda w=copies[i % len(copies)]: cg._launch(x, w.view(-1), qt, n, k, y, cfg))
                    for i in range(ncalls)]
                cfg0 = cg.config(qt, n, k, batch)
                t = time_calls(calls(None), args.reps)
                best = (t, cfg0)
                sweep = []
                if args.sweep:
                    lim = {kv.split("=")[0]: tuple(int(v) for v in kv.split("=")[1].split(","))
                           for kv in args.cand.split()}
                    for cfg in _candidates(qt, n, batch, **lim):
                        ts = time_calls(calls(cfg), args.reps)
                        sweep.append((ts, cfg))
                    sweep.sort()
                    best = min(best, sweep[0])
                cg.gemv(x, copies[0], qt, n, k, out=y)
                tr = err = None
                if not args.no_ref:
                    scratch = torch.empty(n, k, dtype=torch.float16, device="cuda")
                    xh, yh = x.half(), torch.empty(batch, n, device="cuda", dtype=torch.float16)

                    def ref(w):
                        ck.dequantize(w, qt, k, dtype=torch.float16, out=scratch)
                        torch.matmul(xh, scratch.t(), out=yh)
                    tr = time_calls([(lambda w=copies[i % len(copies)]: ref(w)) for i in range(ncalls)], args.reps)
                    ref(copies[0])
                    err = float(((y.float() - yh.float()) ** 2).sum() / (yh.float() ** 2).sum())
                    del scratch
                tq, q8s = (time_q8(copies, qt, x, n, k, ncalls, args.reps, args.q8_sweep)
                           if args.q8 and qt in repack.TYPES else (None, []))
                gbs = nbytes / t / 1e9
                line = (f"{tname:5} {n:>6}x{k:<6} {batch:>2} {nbytes / 1e6:7.1f} | {t * 1e6:8.1f} {gbs:6.0f} "
                        f"{str(cfg0):>15} | ")
                line += f"{tr * 1e6:13.1f} {tr / t:6.2f}x | {err:7.1e}" if tr else f"{'-':>13} {'-':>7} |"
                if tq:
                    line += f" | q8 {tq * 1e6:.1f} us {nbytes / tq / 1e9:.0f} GB/s"
                print(line, flush=True)
                if q8s:
                    print(f"      q8 config {gemv_q8_config(n, k, qt, batch)}; best: " + "  ".join(
                        f"{c} {nbytes / s / 1e9:.0f}GB/s" for s, c in q8s[:4]) + f"  (worst {nbytes / q8s[-1][0] / 1e9:.0f})")
                if sweep:
                    print("      best: " + "  ".join(f"{c} {nbytes / s / 1e9:.0f}GB/s" for s, c in sweep[:4])
                          + f"  (worst {nbytes / sweep[-1][0] / 1e9:.0f})", flush=True)
                results.append(dict(type=tname, n=n, k=k, batch=batch, bytes=nbytes, us=t * 1e6, gbs=gbs,
                                    config=cfg0, ref_us=tr and tr * 1e6, nmse_vs_ref=err,
                                    best=best[1], best_us=best[0] * 1e6, q8_us=tq and tq * 1e6,
                                    sweep=[(c, s * 1e6) for s, c in sweep]))
            del copies
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
