"""GPU benchmarks: the issue-4 acceptance table and the micro-benchmarks behind it.

    python -m lstream.tools.bench_gpu micro                       # H2D, dequant GB/s, GEMM TFLOP/s
    python -m lstream.tools.bench_gpu table MODEL.gguf [-r 5]     # -p 2048 -n 0 at several -ngl/-ub

Honest numbers: warm-up discarded, torch.cuda.synchronize() before reading the clock, mean ± std
over repeats; the copy time hidden behind compute comes from CUDA events on the copy and compute
streams (1 - compute-stream stall / copy-engine busy time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from lstream.backends.cuda import dequant as ck
    from lstream.core.qtypes import QType
except ImportError:  # pragma: no cover - run as a plain script from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lstream.backends.cuda import dequant as ck
    from lstream.core.qtypes import QType


def _time_cuda(fn, reps: int = 10, warm: int = 2) -> list[float]:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return out


def micro(out: dict) -> None:
    from lstream.tools.synth_model import random_tensor
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__} triton {ck.HAVE_TRITON}")
    # H2D from pinned memory: one big copy and layer-sized copies
    for nbytes in (1 << 30, 123_000_000):
        h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        h.random_(0, 255)
        d = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        ts = _time_cuda(lambda: d.copy_(h, non_blocking=True), reps=5)
        gbs = nbytes / statistics.median(ts) / 1e9
        out[f"h2d_pinned_{nbytes}"] = gbs
        print(f"H2D pinned {nbytes / 1e6:8.1f} MB: {gbs:6.1f} GB/s")
        hp = torch.empty(nbytes, dtype=torch.uint8)
        hp.random_(0, 255)
        ts = _time_cuda(lambda: d.copy_(hp), reps=3, warm=1)
        gbs = nbytes / statistics.median(ts) / 1e9
        out[f"h2d_pageable_{nbytes}"] = gbs
        print(f"H2D pageable {nbytes / 1e6:6.1f} MB: {gbs:6.1f} GB/s")
        del h, hp, d
    # D2D copy ceiling
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ts = _time_cuda(lambda: b.copy_(a))
    out["d2d_GBs"] = 2 * a.numel() / statistics.median(ts) / 1e9
    print(f"D2D copy: {out['d2d_GBs']:.0f} GB/s (read+write)")
    del a, b
    # dequantization of an ffn-sized weight (14336 x 4096)
    rows, cols = 14336, 4096
    rng = np.random.default_rng(0)
    res = {}
    for qt in list(ck.QUANT_TYPES) + [QType.F16, QType.BF16]:
        x = torch.from_numpy(np.ascontiguousarray(random_tensor(rng, "w", (rows, cols), qt)).reshape(rows, -1)
                             .view(np.uint8)).to(dev)
        o = torch.empty((rows, cols), dtype=torch.float16, device=dev)
        ts = _time_cuda(lambda: ck.dequantize(x, qt, cols, dtype=torch.float16, out=o), reps=20)
        t = statistics.median(ts)
        moved = x.numel() + o.numel() * 2
        line = {"ms": t * 1e3, "GBps_moved": moved / t / 1e9, "Gweights_per_s": rows * cols / t / 1e9}
        if qt in ck.QUANT_TYPES:
            tt = statistics.median(_time_cuda(lambda: ck.dequantize(x, qt, cols, dtype=torch.float16, out=o,
                                                                    use_triton=False), reps=5))
            line["torch_ms"] = tt * 1e3
        res[qt.name] = line
        print(f"dequant {qt.name:5s} 14336x4096 -> fp16: {t * 1e3:6.3f} ms, {line['GBps_moved']:6.0f} GB/s moved, "
              f"{line['Gweights_per_s']:6.1f} Gw/s" + (f"  (torch fallback {line['torch_ms']:.2f} ms)" if "torch_ms" in line else ""))
    out["dequant"] = res
    # GEMMs of a Llama-3-8B layer
    shapes = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
    per_layer = [(4096, 4096)] * 2 + [(1024, 4096)] * 2 + [(14336, 4096)] * 2 + [(4096, 14336)]
    gem = {}
    for dtype in (torch.float16, torch.bfloat16):
        for m in (512, 2048):
            tot_t = tot_f = 0.0
            for name, (n, k) in shapes.items():
                xa = torch.randn(m, k, device=dev, dtype=dtype)
                w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
                t = statistics.median(_time_cuda(lambda: xa @ w.t(), reps=20))
                gem[f"{dtype}-{m}-{name}"] = 2 * m * n * k / t / 1e12
                mult = per_layer.count((n, k))
                tot_t += t * mult
                tot_f += 2 * m * n * k * mult
            gem[f"{dtype}-{m}-layer_ms"] = tot_t * 1e3
            print(f"GEMM {str(dtype)[6:]:8s} M={m:4d}: layer matmuls {tot_t * 1e3:6.3f} ms, "
                  f"{tot_f / tot_t / 1e12:5.0f} TFLOP/s; " +
                  ", ".join(f"{k}: {gem[f'{dtype}-{m}-{k}']:.0f}" for k in shapes))
    out["gemm"] = gem


CONFIGS = [  # (label, -ngl, -ub, policy)
    ("-ngl 0 -ub 2048", 0, 2048, "threshold"),
    ("-ngl 0 -ub 512", 0, 512, "threshold"),
    ("-ngl 16 -ub 2048", 16, 2048, "threshold"),
    ("-ngl 33 -ub 2048", 33, 2048, "threshold"),
]


def table(model: str, reps: int, n_prompt: int, configs, out: dict, dtype: str = "fp16", n_slots: int = 3,
          speculate: bool = False, warm_ring: bool = False, trace: str | None = None) -> None:
    from lstream.backends.cuda import CUDABackend
    from lstream.api import Model
    from lstream.core.policy import make_policy
    from lstream.loaders.model_file import load_model

    rows = []
    for label, ngl, ub, pol in configs:
        t0 = time.perf_counter()
        policy = make_policy(pol)
        dev = CUDABackend(policy=policy, dtype=dtype, n_slots=n_slots, speculate=speculate)
        m = Model(load_model(model), n_gpu_layers=ngl, policy=policy, n_ctx=n_prompt, n_ubatch=ub,
                  device_backend=dev, load_tokenizer=False)
        load_s = time.perf_counter() - t0
        toks = np.random.default_rng(0).integers(0, m.config.vocab_size, n_prompt)
        times, hidden = [], []
        for r in range(reps + 1):  # the first is warm-up (JIT, pinning, cuBLAS handles)
            m.reset()
            if dev.streamer is not None and not warm_ring:
                dev.streamer.forget()  # each repetition starts with a cold ring (no carried prefetch)
            st = dev.stream_counters()
            before = (st.copy_ms, st.stall_ms) if st else (0.0, 0.0)
            torch.cuda.synchronize()
            t = time.perf_counter()
            m.eval(toks)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            st = dev.stream_counters()
            if r == 0:
                continue
            times.append(dt)
            if st:
                c, s = st.copy_ms - before[0], st.stall_ms - before[1]
                hidden.append((c, s))
        if trace and not rows:  # one more repetition under the profiler: copy/compute overlap, visible
            from torch.profiler import ProfilerActivity, profile
            m.reset()
            if dev.streamer is not None and not warm_ring:
                dev.streamer.forget()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                m.eval(toks)
                torch.cuda.synchronize()
            prof.export_chrome_trace(trace)
        tps = [n_prompt / t for t in times]
        mean, sd = statistics.mean(tps), statistics.stdev(tps) if len(tps) > 1 else 0.0
        copy_ms = statistics.mean(c for c, _ in hidden) if hidden else 0.0
        stall_ms = statistics.mean(s for _, s in hidden) if hidden else 0.0
        tag = "" if (dtype, n_slots, speculate) == ("fp16", 3, False) else f" [{dtype}, {n_slots} slots{', speculation' if speculate else ''}]"
        row = {"test": f"-p {n_prompt} -n 0 {label}{tag}", "tps": mean, "sd": sd, "ms": statistics.mean(times) * 1e3,
               "copy_ms": copy_ms, "stall_ms": stall_ms,
               "hidden": (1 - stall_ms / copy_ms) if copy_ms else None, "load_s": load_s,
               "vram_GiB": torch.cuda.max_memory_allocated() / 2**30,
               "streamed_GB": (dev.streamer.stats.bytes_streamed / max(dev.streamer.stats.runs, 1) / 1e9)
               if dev.streamer else 0.0}
        rows.append(row)
        print(f"{row['test']:34s} {mean:9.0f} ± {sd:5.0f} t/s  ({row['ms']:.1f} ms; copy {copy_ms:.1f} ms, "
              f"stall {stall_ms:.1f} ms, hidden {100 * row['hidden'] if row['hidden'] is not None else float('nan'):.1f}%; "
              f"load {load_s:.1f} s)", flush=True)
        m.close()
        del m, dev
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out.setdefault("table", []).extend(rows)
    print("\n| test | t/s | copy hidden |\n|---|---|---|")
    for r in rows:
        h = f"{100 * r['hidden']:.1f}%" if r["hidden"] is not None else "n/a (nothing streamed)"
        print(f"| `{r['test']}` | {r['tps']:.0f} ± {r['sd']:.0f} | {h} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("micro")
    t = sub.add_parser("table")
    t.add_argument("model")
    t.add_argument("-r", "--reps", type=int, default=5)
    t.add_argument("-p", "--n-prompt", type=int, default=2048)
    t.add_argument("--dtype", default="fp16")
    t.add_argument("--slots", type=int, default=3)
    t.add_argument("--speculate", action="store_true", help="prefetch the next ubatch's first layers early")
    t.add_argument("--warm-ring", action="store_true", help="keep the ring's layers between repetitions")
    t.add_argument("--only", default=None, help="comma-separated config indices")
    t.add_argument("--trace", default=None, help="chrome trace (torch.profiler) of the first config")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    out: dict = {}
    if a.cmd == "micro":
        micro(out)
    else:
        cfgs = CONFIGS if a.only is None else [CONFIGS[int(i)] for i in a.only.split(",")]
        table(a.model, a.reps, a.n_prompt, cfgs, out, a.dtype, a.slots, a.speculate, a.warm_ring, a.trace)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
