"""Measure once per machine what the CostModel policy needs, and cache it on disk.

h2d: pinned host -> device bytes/s; gpu_flops: fp16 GEMM FLOP/s (dequantization is a few % of
it, core/policy.py adds the copy); cpu_weights_per_s: the CPU backend's matrix-vector speed per
weight type at batch 1 with its default threads; cpu_flops: its speed at a 512-token batch.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..core.policy import Calibration
from ..core.qtypes import QTYPE_INFO, QType



def cache_path() -> Path:
    """Where the measurement is kept: $LSTREAM_CALIBRATION, else ~/.cache/lstream/calibration.json."""
    return Path(os.environ.get("LSTREAM_CALIBRATION", Path.home() / ".cache/lstream/calibration.json"))
CPU_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.F16)


def _best(fn, reps: int = 5) -> float:
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def _random_blocks(qt: QType, n_rows: int, n_cols: int, rng) -> np.ndarray:
    """Random bytes with sane fp16 scales: the speed of a kernel does not depend on the values."""
    info = QTYPE_INFO[qt]
    if qt == QType.F16:
        return rng.standard_normal((n_rows, n_cols)).astype(np.float16).view(np.uint8)
    n_blocks = n_rows * n_cols // info.block_size
    raw = rng.integers(0, 256, (n_blocks, info.type_size), dtype=np.uint8)
    scales = np.full(n_blocks, 0.01, np.float16).view(np.uint8).reshape(-1, 2)
    off = info.type_size - 2 if qt == QType.Q6_K else 0  # where the block's fp16 d sits
    raw[:, off:off + 2] = scales
    if qt in (QType.Q4_1, QType.Q5_1, QType.Q4_K, QType.Q5_K):  # their fp16 m / dmin
        raw[:, 2:4] = scales
    return raw.reshape(n_rows, -1)


def measure_cpu(n_rows: int = 14336, n_cols: int = 4096) -> tuple[dict[str, float], float]:
    """A big model's FFN shape: small weights (L2-resident, thread wake-up dominated) would mislead
    the split of a model whose layers stream from DRAM."""
    from .cpu.matmul import matmul
    from .cpu.weights import pack
    rng = np.random.default_rng(0)
    per_s = {}
    x = rng.standard_normal((1, n_cols)).astype(np.float32)
    for qt in CPU_TYPES:
        # four weights in turn: more bytes than a last-level cache, as a model's layers are
        ws = [pack(qt, _random_blocks(qt, n_rows, n_cols, rng), n_rows, n_cols) for _ in range(4)]
        per_s[qt.name] = 4 * n_rows * n_cols / _best(lambda: [matmul(w, x) for w in ws], reps=5)
    w = pack(QType.Q4_0, _random_blocks(QType.Q4_0, 4096, n_cols, rng), 4096, n_cols)
    x = rng.standard_normal((512, n_cols)).astype(np.float32)
    flops = 2.0 * 4096 * n_cols * 512 / _best(lambda: matmul(w, x), reps=2)
    return per_s, flops


def measure_gpu() -> tuple[float, float]:
    import torch
    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")

    def copy():
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
    h2d = host.numel() / _best(copy)
    a = torch.randn(2048, 4096, device="cuda", dtype=torch.float16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)

    def gemm():
        for _ in range(10):
            a @ b.t()
        torch.cuda.synchronize()
    flops = 10 * 2.0 * 2048 * 4096 * 4096 / _best(gemm)
    return h2d, flops


def load_or_measure(path: Path | None = None, remeasure: bool = False) -> Calibration:
    path = path or cache_path()
    if path.exists() and not remeasure:
        d = json.loads(path.read_text())
        return Calibration(d["h2d_bytes_per_s"], d["gpu_flops"], d["cpu_weights_per_s"], d["cpu_flops"])
    h2d, gpu_flops = measure_gpu()
    per_s, cpu_flops = measure_cpu()
    cal = Calibration(h2d, gpu_flops, per_s, cpu_flops)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.__dict__, indent=1))
    return cal


if __name__ == "__main__":  # python -m lstream.backends.calibrate: measure again and print
    print(json.dumps(load_or_measure(remeasure=True).__dict__, indent=1))
