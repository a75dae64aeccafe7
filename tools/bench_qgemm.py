"""Benchmark the fused dequantizing GEMM (backends/cuda/qgemm.py) against today's prefill path.

    python3 -m lstream.tools.bench_qgemm [--types Q4_0,Q4_K] [--shapes 4096x4096,...] [--m 64,512]
                                         [--layout auto|raw|packed] [--sweep] [--json out.json]

Per type, weight shape (N rows x K cols) and token count M (llama.cpp's -ub): three times, each
with its TFLOP/s (2*M*N*K / time):
  fused     qgemm: the best of its candidate configs (candidates(); --sweep tries a wider grid), and
            which config that was
  deq+mm    what the backend did before: dequantize W to bf16 into one reused scratch, then cuBLAS
  bf16      cuBLAS on a pre-dequantized bf16 W: the tensor-core ceiling, measured in the same run
and the fused kernel's NMSE against deq+mm's output. Layout auto: the repacked layout for the
32-weight types (what resident weights use on a GPU with the int8 GEMV), GGUF blocks otherwise.

Honest timing (tools/bench_gemv.py's time_calls): a CUDA graph of back-to-back calls, CUDA events,
median of --reps replays; the calls rotate over copies of W (>= 256 MB of the measured format) so
W comes from memory as in a real prefill, where each layer's weights are read once per ubatch.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

try:
    from lstream.backends.cuda import dequant as ck
    from lstream.backends.cuda import gemv_q8
    from lstream.backends.cuda import qgemm as qg
    from lstream.backends.cuda import repack
    from lstream.core.qtypes import QTYPE_INFO, QType
    from lstream.tools.bench_gemv import ROTATE_BYTES, random_blocks, time_calls
except ImportError:  # pragma: no cover - run as a plain script from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lstream.backends.cuda import dequant as ck
    from lstream.backends.cuda import gemv_q8
    from lstream.backends.cuda import qgemm as qg
    from lstream.backends.cuda import repack
    from lstream.core.qtypes import QTYPE_INFO, QType
    from lstream.tools.bench_gemv import ROTATE_BYTES, random_blocks, time_calls

# Llama-3-8B: q/o, k/v, gate/up, down, gate|up stacked, output head
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (28672, 4096), (128256, 4096)]


def sweep_configs(qt: QType, n: int, k: int, m: int) -> list[qg.Cfg]:
    """A wider grid than candidates(), for tuning its table (qg.fit makes each legal)."""
    out = dict.fromkeys(qg.candidates(qt, n, k, m, "cuda"))
    sms = qg._sms(torch.device("cuda"))
    for bm, bn, bk, swap, nw, ns in itertools.product((16, 32, 64, 128, 256), (64, 128, 256), (64, 128), (0, 1),
                                                      (4, 8), (3, 4)):
        if bm > 2 * max(16, m) or bm * bn > 256 * 128 or (swap == 0 and bm < 64):
            continue
        c = qg.fit(qg.Cfg(bm, bn, bk, swap, 1, nw, ns), qt, k)
        out[qg.fit(c._replace(split=qg._split(m, n, k, c.bm, c.bn, c.bk, sms)), qt, k)] = None
    return list(out)


def bench_one(qt: QType, layout: str, n: int, k: int, ms: list[int], reps: int, sweep: bool) -> list[dict]:
    info = QTYPE_INFO[qt]
    nbytes = n * k // info.block_size * info.type_size
    raw = [random_blocks(qt, n, k) for _ in range(max(1, math.ceil(ROTATE_BYTES / nbytes)))]
    dense = [ck.dequantize(r, qt, k, dtype=torch.bfloat16) for r in raw[:max(1, math.ceil(ROTATE_BYTES / (2 * n * k)))]]
    ws = [repack.repack(r, qt, n, k) for r in raw] if layout == "packed" else raw
    del raw
    ncalls = max(len(ws), 4)
    scratch = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").bfloat16()
        flop = 2.0 * m * n * k

        def deq_mm(w):  # the backend's _dequant: repacked weights through gemv_q8's kernel
            if isinstance(w, repack.Packed):
                gemv_q8.dequantize(w, torch.bfloat16, scratch)
            else:
                ck.dequantize(w, qt, k, dtype=torch.bfloat16, out=scratch)
            return x @ scratch.t()
        t_ref = time_calls([lambda w=ws[i % len(ws)]: deq_mm(w) for i in range(ncalls)], reps)
        t_bf = time_calls([lambda w=dense[i % len(dense)]: x @ w.t() for i in range(max(len(dense), 4))], reps)
        ref = deq_mm(ws[0]).float()
        best = None
        for cfg in (sweep_configs(qt, n, k, m) if sweep else qg.candidates(qt, n, k, m, "cuda")):
            try:
                t = time_calls([lambda w=ws[i % len(ws)]: qg.qgemm(x, w, qt, n, k, torch.bfloat16, cfg)
                                for i in range(ncalls)], reps)
            except Exception as e:  # noqa: BLE001 - e.g. a config past the shared memory
                print(f"  {qt.name} {n}x{k} M={m} {tuple(cfg)}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        if best is None:
            continue
        y = qg.qgemm(x, ws[0], qt, n, k, torch.bfloat16, best[1]).float()
        err = float(((y - ref) ** 2).sum() / (ref ** 2).sum())
        r = dict(type=qt.name, layout=layout, n=n, k=k, m=m, fused_us=best[0] * 1e6, cfg=list(best[1]),
                 deq_mm_us=t_ref * 1e6, bf16_us=t_bf * 1e6, fused_tflops=flop / best[0] / 1e12,
                 deq_mm_tflops=flop / t_ref / 1e12, bf16_tflops=flop / t_bf / 1e12, nmse=err)
        print(f"{qt.name:5} {layout:6} {n:>6}x{k:<6} {m:>5} | {r['fused_us']:9.1f} {r['fused_tflops']:6.0f} "
              f"{str(tuple(best[1])):>28} | {r['deq_mm_us']:9.1f} {r['deq_mm_tflops']:6.0f} | {r['bf16_us']:9.1f} "
              f"{r['bf16_tflops']:6.0f} | {t_ref / best[0]:5.2f}x | {err:7.1e}", flush=True)
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q4_0,Q4_K")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--m", default="64,128,256,512,1024,2048", help="token counts (-ub)")
    ap.add_argument("--layout", default="auto", choices=["auto", "raw", "packed"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="time a wider grid of configs (slow)")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    import triton
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  bf16")
    print(f"{'type':5} {'layout':6} {'N x K':>13} {'M':>5} | {'fused us':>9} {'TF/s':>6} "
          f"{'config (BM,BN,BK,SWAP,SPLIT,W,S)':>28} | {'deq+mm us':>9} {'TF/s':>6} | {'bf16 us':>9} {'TF/s':>6} | "
          f"{'gain':>6} | {'nmse':>7}")
    ms = [int(v) for v in args.m.split(",")]
    results = []
    for tname in args.types.split(","):
        qt = QType[tname]
        layout = args.layout
        if layout == "auto":
            layout = "packed" if qt in repack.TYPES else "raw"
        if layout == "packed" and qt not in repack.TYPES:
            layout = "raw"
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            results += bench_one(qt, layout, n, k, ms, args.reps, args.sweep)
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
