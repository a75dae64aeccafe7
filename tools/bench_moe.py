"""Benchmark the MoE expert kernels (backends/cuda/moe_kernels.py) against the path they replace.

    python -m lstream.tools.bench_moe [--types Q4_0,Q4_0p,Q4_K] [--decode 1,8] [--prefill 512,2048]
                                      [--sweep] [--no-old] [--json out.json]

Shapes: Qwen3-30B-A3B's experts (128 of 2048 -> 768 -> 2048, top 8; --shape/--experts/--top-k to
change). A trailing p on a type: the repacked layout (repack.Packed) instead of GGUF blocks.
Decode (T tokens): the fused op (gate|up GEMV with SiLU*up, weighted down GEMV, top-k sum) against
the old one (gather the routed experts' blocks by id, dequantize, bmm), each a CUDA graph of calls
with a fresh routing per call (the experts read differ, as from layer to layer), timed with
selfcheck.graph_times. GB/s: the bytes of the distinct experts a call reads / its time.
Prefill (ubatch T): the two grouped GEMMs with routing, sorting and SiLU (graph timed: no host sync)
against the old per-expert loop (dequantize + cuBLAS per used expert; it syncs, so timed by events
around whole calls). TFLOP/s: 2 * T * top_k * 3 * dim * ffn / time.
--sweep: decode configs (BN, BK, warps) of each kernel and qgemm's candidate tiles for the grouped
GEMM, best first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

try:
    from lstream.backends.cuda import dequant as ck, moe_kernels as mk, qgemm as qg, repack, selfcheck
    from lstream.core.qtypes import QTYPE_INFO, QType
    from lstream.tools.bench_gemv import random_blocks
except ImportError:  # pragma: no cover - run as a plain script from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lstream.backends.cuda import dequant as ck, moe_kernels as mk, qgemm as qg, repack, selfcheck
    from lstream.core.qtypes import QTYPE_INFO, QType
    from lstream.tools.bench_gemv import random_blocks

N_ROUTES = 16  # calls per graph, each with its own routing


def experts(name: str, E: int, rows: int, cols: int):
    qt, packed = QType[name.rstrip("p")], name.endswith("p")
    raw = random_blocks(qt, E * rows, cols)
    w = repack.repack(raw, qt, E * rows, cols) if packed else raw
    return mk.Experts(qt, E, rows, cols, w), raw


def routes(T: int, E: int, k: int, n: int):
    out = []
    for i in range(n):
        g = torch.Generator(device="cpu").manual_seed(1000 * T + i)
        w, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), k, dim=-1)
        out.append((ids.cuda(), (w / w.sum(-1, keepdim=True)).cuda()))
    return out


def old_decode(x, ids, wts, raws, qts, shapes):
    """backends/cuda/moe.py's first small-batch path: blocks gathered by id, dequantized, bmm."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    mats = [ck.dequantize(r.view(shapes[i][0], -1)[flat], qts[i], shapes[i][2], dtype=torch.bfloat16)
            .view(len(flat), shapes[i][1], shapes[i][2]) for i, r in enumerate(raws)]
    xp = x.bfloat16().repeat_interleave(k, dim=0)[:, :, None]
    g, u = torch.bmm(mats[0], xp)[..., 0], torch.bmm(mats[1], xp)[..., 0]
    h = (F.silu(g.float()) * u.float()).bfloat16()[:, :, None]
    y = torch.bmm(mats[2], h)[..., 0].float().view(T, k, -1)
    return (y * wts[..., None]).sum(dim=1)


def old_prefill(x, ids, wts, raws, qts, shapes):
    """The first large-batch path: per used expert (host loop), dequantize its three matrices, matmul."""
    T, k = ids.shape
    out = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=shapes[0][0]).tolist()  # syncs, as the old path did
    xb, wflat, s = x.bfloat16(), wts.reshape(-1), 0
    for e, c in enumerate(counts):
        if not c:
            continue
        pairs = order[s:s + c]
        s += c
        tok = pairs // k
        m = [ck.dequantize(r.view(shapes[i][0], -1)[e], qts[i], shapes[i][2], dtype=torch.bfloat16)
             for i, r in enumerate(raws)]
        xe = xb[tok]
        h = (F.silu((xe @ m[0].t()).float()) * (xe @ m[1].t()).float()).bfloat16()
        out.index_add_(0, tok, (h @ m[2].t()).float() * wflat[pairs][:, None])
    return out


def expert_bytes(ex: mk.Experts) -> int:
    info = QTYPE_INFO[ex.qtype]
    return ex.n_rows * ex.n_cols // info.block_size * info.type_size


def t_graph(calls, reps) -> float:
    return statistics.median(selfcheck.graph_times(calls, reps))


def t_events(calls, reps) -> float:
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for c in calls:
            c()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / len(calls))
    return statistics.median(ts)


def bench_decode(c, T: int) -> dict:
    """c: the type's context (main): name, gu, dn, old (raws, qts, shapes) or None, dim, ffn, E, k, args."""
    gu, dn, a = c.gu, c.dn, c.args
    rs = routes(T, c.E, c.k, N_ROUTES)
    x = torch.randn(T, c.dim, device="cuda").bfloat16()
    nbytes = statistics.mean(len(torch.unique(i)) for i, _ in rs) * (expert_bytes(gu) + expert_bytes(dn))
    t = t_graph([(lambda i=i, w=w: mk.decode(x, i, w, gu, dn)) for i, w in rs], a.reps)
    r = dict(type=c.name, kind="decode", T=T, us=t * 1e6, GBps=nbytes / t / 1e9)
    if c.old:
        to = t_graph([(lambda i=i, w=w: old_decode(x, i, w, *c.old)) for i, w in rs], a.reps)
        r.update(old_us=to * 1e6, speedup=to / t)
    print(json.dumps(r), flush=True)
    if a.sweep:
        res = []
        for bn in (4, 8, 16, 32):
            for bk in (128, 256, 512):
                for nw in (1, 2, 4, 8):
                    if bn * bk < 256 * nw or bn * bk > 64 * 32 * nw or bk != qg._bk(bk, gu.qtype, c.ffn):
                        continue
                    cfg = ((bn, qg._bk(bk, gu.qtype, c.dim), nw), (bn, bk, nw))
                    try:
                        tc = t_graph([(lambda i=i, w=w: mk.decode(x, i, w, gu, dn, cfg=cfg)) for i, w in rs], 5)
                    except Exception as exc:  # noqa: BLE001 - a config that fails to build
                        print(f"  {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    res.append((tc, cfg))
        for tc, cfg in sorted(res)[:6]:
            print(f"  sweep {c.name} T={T} {cfg}: {tc * 1e6:.1f} us {nbytes / tc / 1e9:.0f} GB/s", flush=True)
    return r


def bench_prefill(c, T: int) -> dict:
    gu, dn, a, k = c.gu, c.dn, c.args, c.k
    rs = routes(T, c.E, k, 4)
    x = torch.randn(T, c.dim, device="cuda").bfloat16()
    flops = 2 * T * k * 3 * c.dim * c.ffn
    t = t_graph([(lambda i=i, w=w: mk.prefill(x, i, w, gu, dn)) for i, w in rs], a.reps)
    r = dict(type=c.name, kind="prefill", T=T, us=t * 1e6, TFLOPs=flops / t / 1e12,
             cfg=[tuple(mk.grouped_cfg(gu, T * k)), tuple(mk.grouped_cfg(dn, T * k))])
    if c.old:
        to = t_events([(lambda i=i, w=w: old_prefill(x, i, w, *c.old)) for i, w in rs], 3)
        r.update(old_us=to * 1e6, speedup=to / t)
    print(json.dumps(r), flush=True)
    if a.sweep:
        res = []
        for c1 in qg.candidates(gu.qtype, gu.n_rows, c.dim, T * k // c.E) + \
                qg.candidates(gu.qtype, gu.n_rows, c.dim, 4 * T * k // c.E):
            c1 = c1._replace(split=1)
            c2 = qg.fit(c1, dn.qtype, c.ffn)
            try:
                tc = t_graph([(lambda i=i, w=w: mk.prefill(x, i, w, gu, dn, cfgs=(c1, c2))) for i, w in rs], 5)
            except Exception as exc:  # noqa: BLE001
                print(f"  {tuple(c1)}: {type(exc).__name__}", flush=True)
                continue
            res.append((tc, tuple(c1)))
        for tc, cfg in sorted(res)[:6]:
            print(f"  sweep {c.name} T={T} {cfg}: {tc * 1e6:.1f} us {flops / tc / 1e12:.1f} TFLOP/s", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q4_0,Q4_0p,Q4_K,Q8_0")
    ap.add_argument("--shape", default="2048x768", help="model dim x expert ffn")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--decode", default="1,8")
    ap.add_argument("--prefill", default="512,2048")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-old", action="store_true", help="skip the old paths")
    ap.add_argument("--json")
    a = ap.parse_args()
    dim, ffn = (int(v) for v in a.shape.split("x"))
    E, rows = a.experts, []
    for name in a.types.split(","):
        gu, gu_raw = experts(name, E, 2 * ffn, dim)
        dn, dn_raw = experts(name, E, dim, ffn)
        old = None
        if not a.no_old and not name.endswith("p"):  # gate and up apart, as the old path read them
            half = gu_raw.view(E, -1).shape[1] // 2
            raws = [gu_raw.view(E, -1)[:, :half].contiguous(), gu_raw.view(E, -1)[:, half:].contiguous(), dn_raw]
            old = (raws, [gu.qtype] * 3, [(E, ffn, dim), (E, ffn, dim), (E, dim, ffn)])
        c = SimpleNamespace(name=name, gu=gu, dn=dn, old=old, dim=dim, ffn=ffn, E=E, k=a.top_k, args=a)
        rows += [bench_decode(c, int(T)) for T in a.decode.split(",") if T]
        rows += [bench_prefill(c, int(T)) for T in a.prefill.split(",") if T]
        del c, gu, dn, gu_raw, dn_raw, old
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
