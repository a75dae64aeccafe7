"""Build the MoE kernels (backends/cuda/moe_kernels.py) for sm_90 on any machine (no GPU): registers,
spills, shared memory and the k loop's SASS instructions per weight, as tools/qgemm_build.py does for
qgemm.

    python -m lstream.tools.moe_build [TYPES] [--shape 2048x768]

TYPES: comma-separated, a trailing p for the repacked layout (default Q4_0,Q4_0p,Q8_0,Q4_K,Q6_K).
Per type: the decode gate|up and down kernels at the configs moe_kernels picks for 1 and 8 tokens on
Qwen3-30B-A3B shapes (128 experts, 2048 x 768, top 8), and the grouped GEMM at its configs for
ubatch 512 and 2048.
"""
from __future__ import annotations

import argparse
import re
from types import SimpleNamespace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lstream.backends.cuda import moe_kernels as mk
from lstream.backends.cuda import qgemm as qg
from lstream.core.qtypes import QType
from lstream.tools.qgemm_build import _raw_format, loop_mix, ptxas


def _fmt(qt: QType, packed: bool):
    if packed:
        bits, off, has_min, qh, qs = qg._G32[qt]
        return dict(FMT=1, TS=0, BITS=bits, OFF=off, HAS_MIN=has_min, QH=qh, QS=qs), \
            ["*i32", "*fp16", "*fp16", "*i32" if qh >= 0 else "*fp16"]
    return _raw_format(qt)


def build(kernel, ptr_types: dict, cx: dict, warps: int, stages: int = 3):
    """kernel's arguments: pointers typed by ptr_types (name -> type), other non-constexprs i32."""
    sig = {n: "constexpr" if n in cx else ptr_types.get(n, "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n].startswith("*") or n in ("N", "RS")}
    return triton.compile(ASTSource(kernel, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def report(label: str, k, weights_per_iter: int, warps: int, all_weights: int) -> None:
    """all_weights: the program's weights, for a k loop ptxas unrolled (constexpr K of few steps):
    then the whole kernel's instructions are counted."""
    err, sass = ptxas(k)
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    try:
        n = sum(loop_mix(sass).values())
    except IndexError:  # no backward branch: the k loop is unrolled
        n = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))
        weights_per_iter = all_weights
    print(f"{label:52} regs {regs.group(1) if regs else '?':>4} spill {spill.group(1) if spill else '?':>4} "
          f"smem {k.metadata.shared:>6} loop {n:5} instr/weight {n * 32 * warps / weights_per_iter:5.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("types", nargs="?", default="Q4_0,Q4_0p,Q8_0,Q4_K,Q6_K")
    ap.add_argument("--shape", default="2048x768", help="model dim x expert ffn")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    a = ap.parse_args()
    dim, ffn = (int(v) for v in a.shape.split("x"))
    for name in a.types.split(","):
        qt, packed = QType[name.rstrip("p")], name.endswith("p")
        cx, ptrs = _fmt(qt, packed)
        wp = dict(zip(("q_ptr", "h_ptr", "b_ptr", "e_ptr"), ptrs))
        gu = SimpleNamespace(qtype=qt, n_cols=dim, n_expert=a.experts, n_rows=2 * ffn)
        dn = SimpleNamespace(qtype=qt, n_cols=ffn, n_expert=a.experts, n_rows=dim)
        for T in (1, 8):
            bn, bk, nw = mk.gemv_cfg(gu, ffn, T * a.top_k)
            k = build(mk._k_gate_up, {"x_ptr": "*fp32", "ids_ptr": "*i64", "out_ptr": "*fp32", **wp,
                                      **{"u" + n[0] + "_ptr": t for n, t in wp.items()}},
                      dict(KTOP=a.top_k, K=dim, **cx, SEP=False, BN=bn, BK=bk), nw)
            report(f"{name} gate_up T={T} BN={bn} BK={bk} w={nw}", k, 2 * bn * bk, nw, 2 * bn * dim)
            bn, bk, nw = mk.gemv_cfg(dn, dim, T * a.top_k)
            k = build(mk._k_down, {"h_ptr": "*fp32", "ids_ptr": "*i64", "wt_ptr": "*fp32", "out_ptr": "*fp32",
                                   **{("hs_ptr" if n == "h_ptr" else n): t for n, t in wp.items()}},
                      dict(K=ffn, **cx, BN=bn, BK=bk), nw)
            report(f"{name} down    T={T} BN={bn} BK={bk} w={nw}", k, bn * bk, nw, bn * ffn)
        for ub in (512, 2048):
            for ex, kk in ((gu, dim), (dn, ffn)):
                c = mk.grouped_cfg(ex, ub * a.top_k)
                k = build(mk._k_grouped, {"x_ptr": "*bf16", "src_ptr": "*i32", "te_ptr": "*i32", "tm_ptr": "*i32",
                                          "tend_ptr": "*i32", "out_ptr": "*fp32", **wp},
                          dict(K=kk, **cx, BM=c.bm, BN=c.bn, BK=c.bk, SWAP=c.swap, INTERP=False), c.warps, c.stages)
                report(f"{name} grouped ub={ub} N={ex.n_rows} {tuple(c)}", k, c.bn * c.bk, c.warps, c.bn * kk)


if __name__ == "__main__":
    main()
