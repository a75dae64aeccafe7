"""Prefill matmuls: the fused dequantizing GEMM (qgemm.py) or dequantize + cuBLAS, by measurement.

Which is faster depends on the type, the shape and the token count in ways a table would guess
wrong (the fused kernel saves the dequantization pass; cuBLAS multiplies faster once M is large),
so the first matmul of each (weight format, qtype, shape, dtype, power-of-two token bucket) times
both on its own operands (each fused candidate config and the current path, CUDA events, after a
warm-up call, L2 flushed before each timed call as weights are never in L2 in a real prefill) and
keeps the winner for the process. Never during CUDA-graph capture: a capture with no choice yet
takes the current path and decides nothing.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

from ...core.qtypes import QType
from . import qgemm as qg
from .repack import Packed

REPS = 5
MARGIN = 0.9  # a fused config must time under this share of dequantize + cuBLAS to be chosen
_choice: dict[tuple, qg.Cfg | None] = {}  # key -> winning config, None: dequantize + cuBLAS
_flush: dict[int, torch.Tensor] = {}


def bucket(m: int) -> int:
    return max(16, 1 << (m - 1).bit_length())


def usable(x: torch.Tensor, w, qtype: QType, dtype: torch.dtype) -> bool:
    """Where the fused kernel can stand in: half-precision operands (fp32, the reference precision,
    keeps its float matmul) of a supported format, on a GPU or in Triton's interpreter."""
    if dtype not in (torch.bfloat16, torch.float16) or not qg.HAVE_TRITON:
        return False
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return w.qtype in qg._G32 if isinstance(w, Packed) else QType(qtype) in qg.TYPES


def _cublas(x: torch.Tensor, dtype: torch.dtype, dequant: Callable[[], torch.Tensor]) -> torch.Tensor:
    return x.to(dtype) @ dequant().t()


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _time(fn: Callable[[], object], dev: torch.device) -> float:
    """Median seconds of fn() over REPS calls after one warm-up (compiles, cuBLAS heuristics)."""
    fn()
    if dev.type != "cuda":  # the interpreter (tests): wall clock
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    flush = _flush.get(dev.index)
    if flush is None:  # twice the L2: weights arrive from memory in a real prefill, not from L2
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20)
        flush = _flush[dev.index] = torch.empty(2 * l2, dtype=torch.uint8, device=dev)
    evs = []
    for _ in range(REPS):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        evs.append((a, b))
    evs[-1][1].synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs) / 1e3


def _pick(x, w, qtype, n_rows, n_cols, dtype, dequant) -> tuple[qg.Cfg | None, dict]:
    """Time the current path and each fused candidate; (the winner, all times in seconds)."""
    times = {"cublas": _time(lambda: _cublas(x, dtype, dequant), x.device)}
    for cfg in qg.candidates(qtype, n_rows, n_cols, x.shape[0], x.device):
        try:
            times[cfg] = _time(lambda: qg.qgemm(x, w, qtype, n_rows, n_cols, dtype, cfg), x.device)
        except Exception:  # noqa: BLE001 - a config that fails to compile here (shared memory) just loses
            continue
    best = min(times, key=times.get)
    # the fastest of several noisy candidates reads low (H200: the 4096x4096 q/o projections at 512
    # tokens went to qgemm in one process, ~60 us against ~35 in the profiles): leave cuBLAS only
    # for a clear win
    if best != "cublas" and times[best] > MARGIN * times["cublas"]:
        best = "cublas"
    return (None if best == "cublas" else best), times


def matmul(x: torch.Tensor, w, qtype: QType, n_rows: int, n_cols: int, dtype: torch.dtype,
           dequant: Callable[[], torch.Tensor]) -> torch.Tensor:
    """y = x @ W^T in `dtype` for a prefill-sized x. w: the weight's GGUF blocks or Packed;
    dequant(): the current path's full float weight (the backend's scratch)."""
    if not usable(x, w, qtype, dtype):
        return _cublas(x, dtype, dequant)
    key = (isinstance(w, Packed), int(w.qtype if isinstance(w, Packed) else qtype), n_rows, n_cols,
           bucket(x.shape[0]), dtype, x.device)
    if key not in _choice:
        if _capturing(x):
            return _cublas(x, dtype, dequant)
        _choice[key] = _pick(x, w, qtype, n_rows, n_cols, dtype, dequant)[0]
    cfg = _choice[key]
    if cfg is None:
        return _cublas(x, dtype, dequant)
    return qg.qgemm(x, w, qtype, n_rows, n_cols, dtype, cfg)


def choices() -> dict:
    """What was decided so far (for `lstream bench` and debugging)."""
    return dict(_choice)
