"""The CUDA backend's newer kernels proven on this device before use, once per process and device.

Each check runs a kernel on small random inputs against its torch reference. A kernel that fails to
build or disagrees is not used: one warning line, and the backend takes the older path (the Gluon
GEMV on GGUF blocks; unfused decode ops with SDPA attention), which computes the same function.
"""
from __future__ import annotations

import statistics
import warnings

import numpy as np
import torch

from ...core.qtypes import QType

_RESULTS: dict[str, dict[str, bool]] = {}


def _nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def _gemv_q8(dev) -> bool:
    from . import gemv_q8, repack
    g = torch.Generator(device="cpu").manual_seed(0)
    for qt, ts in ((QType.Q4_0, 18), (QType.Q5_1, 24), (QType.Q8_0, 34)):
        raw = torch.randint(0, 256, (64 * 8, ts), generator=g, dtype=torch.uint8)
        raw[:, 0:2] = (torch.rand(64 * 8, 1, generator=g) * 0.01 + 0.005).half().view(torch.uint8)
        if qt == QType.Q5_1:
            raw[:, 2:4] = (torch.rand(64 * 8, 1, generator=g) * 0.01).half().view(torch.uint8)
        p = repack.repack(raw.to(dev), qt, 64, 256)
        x = torch.randn(2, 256, generator=g).to(dev)
        ref = x.double() @ gemv_q8.dequantize(p, torch.float32).double().t()
        if _nmse(gemv_q8.gemv(x, p), ref) > 5e-4:
            return False
        if not torch.equal(gemv_q8.dequantize(p, torch.float32).cpu(), gemv_q8._dequantize_torch(p).cpu()):
            return False
    return True


def _decode(dev) -> bool:
    from . import decode_kernels as dk
    g = torch.Generator(device="cpu").manual_seed(1)
    x, h = (torch.randn(2, 256, generator=g).to(dev) for _ in range(2))
    w = torch.randn(256, generator=g).to(dev)  # the norm's weight: one row for every token
    s, y = dk.add_rms_norm(x, h, w, 1e-6, torch.float32)
    rs = x + h
    if _nmse(s, rs) > 1e-10 or _nmse(y, rs * torch.rsqrt(rs.square().mean(-1, keepdim=True) + 1e-6) * w) > 1e-8:
        return False
    gu = torch.randn(2, 512, generator=g).to(dev)
    if _nmse(dk.act(gu[:, :256], gu[:, 256:], False, torch.float32),
             torch.nn.functional.silu(gu[:, :256]) * gu[:, 256:]) > 1e-8:
        return False
    n_kv, hd = 2, 64
    kc = torch.randn(40, n_kv, hd, generator=g).to(torch.bfloat16).to(dev)
    vc = torch.randn(40, n_kv, hd, generator=g).to(torch.bfloat16).to(dev)
    pos = torch.tensor([30, 31], device=dev)
    q = torch.randn(2, 8, hd, generator=g).to(dev)
    out = dk.attention(q, kc, vc, pos, hd ** -0.5, 0, 8, n_kv, torch.float32)
    return _nmse(out, dk.attention_reference(q, kc, vc, pos, hd ** -0.5, 0, n_kv)) < 1e-4


def _moe(dev) -> bool:
    """moe_kernels' decode GEMVs and grouped GEMMs on random Q4_0 / Q4_K experts against their torch
    fallback (the same operands in fp32): 4 experts of 256 x 256 (x2 for gate|up), top 2."""
    from ...core.qtypes import QTYPE_INFO
    from . import moe_kernels as mk
    g = torch.Generator(device="cpu").manual_seed(3)
    for qt in (QType.Q4_0, QType.Q4_K):
        info = QTYPE_INFO[qt]
        exs = []
        for rows in (512, 256):
            raw = torch.randint(0, 256, (rows * 4 * 256 // info.block_size, info.type_size), generator=g,
                                dtype=torch.uint8)
            raw[:, 0:2] = (torch.rand(raw.shape[0], 1, generator=g) * 0.01 + 0.005).half().view(torch.uint8)
            if qt == QType.Q4_K:
                raw[:, 2:4] = (torch.rand(raw.shape[0], 1, generator=g) * 0.01).half().view(torch.uint8)
            exs.append(mk.Experts(qt, 4, rows, 256, raw.to(dev).view(4 * rows, -1)))
        for T in (3, 20):
            w, ids = torch.topk(torch.rand(T, 4, generator=g), 2, dim=-1)
            ids, w = ids.to(dev), w.to(dev)
            x = torch.randn(T, 256, generator=g).to(dev)
            ref = mk._decode_torch(x, ids, w, *exs)
            if _nmse(mk.decode(x, ids, w, *exs), ref) > 1e-8:
                return False
            if T > 8 and _nmse(mk.prefill(x.to(torch.bfloat16), ids, w, *exs), ref) > 1e-3:
                return False
    from ...core.moe import route
    logits = torch.randn(5, 60, generator=g)  # the router: ids exact, weights to fp32 rounding
    for k, norm in ((8, True), (4, False)):
        ids, w = mk.route(logits.to(dev), k, norm)
        ri, rw = route(logits.numpy(), k, norm)
        if not np.array_equal(ids.cpu().numpy(), ri) or not np.allclose(w.cpu().numpy(), rw, rtol=1e-5, atol=0):
            return False
    return True


def _prefill(dev) -> bool:
    from . import prefill_attention as pa
    g = torch.Generator(device="cpu").manual_seed(2)
    n_kv, hd, t = 2, 64, 80
    kc = torch.randn(160, n_kv, hd, generator=g).to(torch.bfloat16).to(dev)
    vc = torch.randn(160, n_kv, hd, generator=g).to(torch.bfloat16).to(dev)
    q = torch.randn(t, 8 * hd, generator=g).to(dev)
    pos = torch.arange(50, 50 + t, device=dev)
    out = pa.prefill_attention(q, kc, vc, pos, hd ** -0.5, 0, 8, n_kv, torch.float32)
    ref = pa.prefill_attention_reference(q, kc, vc, pos, hd ** -0.5, 0, 8, n_kv)
    return _nmse(out, ref) < 1e-4


CHECKS = {"gemv_q8": _gemv_q8, "decode": _decode, "moe": _moe, "prefill": _prefill}
TIMES: dict[str, dict[str, float]] = {}  # device -> {kernel: microseconds per call}, as measured


def graph_times(calls, reps: int) -> list[float]:
    """Seconds per call of each of `reps` replays of one CUDA graph of all `calls` (compiled
    before the capture). Timing launches one by one would measure the host: a ~30 us kernel costs
    about as much to launch from Python, while decode replays them from a graph."""
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / len(calls))
    return out


def _time_us(calls, reps: int = 5) -> float:
    return statistics.median(graph_times(calls, reps)) * 1e6


def gemv_q8_faster(dev) -> bool:
    """The int8 GEMV on repacked rows is used only where it beats the GGUF-block GEMV here: one
    token through an 8B FFN-sized Q4_0 weight (28672 x 4096, 66 MB; two copies, alternately, so
    the 50-60 MB L2 cannot hold it), each as decode runs it: replayed from a CUDA graph."""
    from . import gemv as cg
    from . import gemv_q8, repack
    g = torch.Generator(device=dev).manual_seed(2)  # made on the device: no host work at start-up
    n_rows, n_cols = 28672, 4096
    raws, packs = [], []
    for _ in range(2):
        raw = torch.randint(0, 256, (n_rows * n_cols // 32, 18), generator=g, dtype=torch.uint8, device=dev)
        raw[:, 0:2] = torch.full((1,), 0.01, dtype=torch.float16, device=dev).view(torch.uint8)
        raws.append(raw)
        packs.append(repack.repack(raw, QType.Q4_0, n_rows, n_cols))
    x = torch.randn(1, n_cols, generator=g, device=dev)
    xb, out = x.to(torch.bfloat16), torch.empty(1, n_rows, device=dev)
    q8 = [lambda p=p: gemv_q8.gemv(x, p, out=out) for p in packs] * 8
    gg = [lambda r=r: cg.gemv(xb, r, QType.Q4_0, n_rows, n_cols, out=out) for r in raws] * 8
    t = {"gemv_q8": _time_us(q8), "gemv": _time_us(gg)}
    TIMES[str(dev)] = t
    return t["gemv_q8"] < t["gemv"]


def kernels_ok(device: torch.device) -> dict[str, bool]:
    """{check name: passed} for this device (every check passes off a real GPU: nothing to prove)."""
    if device.type != "cuda":
        return {k: True for k in CHECKS}
    key = str(device)
    if key not in _RESULTS:
        res = {name: _run(name, device) for name in CHECKS}
        if res["gemv_q8"]:  # correct here; used if also faster (a choice, no warning)
            res["gemv_q8"] = gemv_q8_faster(device)
        _RESULTS[key] = res
    return _RESULTS[key]


def _run(name: str, device) -> bool:
    try:
        ok = CHECKS[name](device)
        why = "disagrees with its torch reference"
    except Exception as e:  # noqa: BLE001 - a kernel that cannot build here is not used
        ok, why = False, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if not ok:
        warnings.warn(f"lstream: the {name} kernels {why} on {torch.cuda.get_device_name(device)}; "
                      f"using the older path", RuntimeWarning, stacklevel=3)
    return ok


def kernel_ok(device: torch.device, name: str) -> bool:
    """One check (kernels_ok's result where it ran; kernels_ok also times the int8 GEMV, with Gluon)."""
    if device.type != "cuda":
        return True
    key = str(device)
    if key in _RESULTS and name in _RESULTS[key]:
        return _RESULTS[key][name]
    one = _SINGLE.setdefault(key, {})
    if name not in one:
        one[name] = _run(name, device)
    return one[name]


_SINGLE: dict[str, dict[str, bool]] = {}  # device -> {check: passed}, checks run alone
