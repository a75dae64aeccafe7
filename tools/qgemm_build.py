"""Build qgemm's kernel for sm_90 on any machine (no GPU) and report what the build says.

    python -m lstream.tools.qgemm_build Q4_0p:256,128,64,1,1,8,3 Q4_K:table ...

Spec: TYPE (append p for the repacked layout) : a Cfg (BM,BN,BK,SWAP,SPLIT,warps,stages) or
"table" (every config of qgemm._TABLE, made legal by qgemm.fit). Per build: registers, spill
bytes, shared memory, the main loop's SASS instruction count, instructions per weight of the W
tile (~ per-thread ALU cost of the dequantization), the MMA clocks of a k step over its issue
clocks (4 schedulers, 2048 bf16 MACs/clk/SM: below 1 the loop is issue-bound, not MMA-bound), and
SER where ptxas serializes the wgmmas (warning C7515). Triton's own ptxas and cuobjdump do the
work; the tile table of qgemm.py was chosen this way, then is measured on the GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lstream.backends.cuda import qgemm as qg
from lstream.core.qtypes import QTYPE_INFO, QType

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def build(qt: QType, packed: bool, cfg: qg.Cfg):
    if packed:
        bits, off, has_min, qh, qs = qg._G32[qt]
        cx = dict(FMT=1, TS=0, BITS=bits, OFF=off, HAS_MIN=has_min, QH=qh, QS=qs)
        ptrs = ["*i32", "*fp16", "*fp16", "*i32" if qh >= 0 else "*fp16"]
    else:
        cx, ptrs = _raw_format(qt)
    cx.update(BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SWAP=cfg.swap, INTERP=False)
    types = ["*bf16"] + ptrs + ["*fp32" if cfg.split > 1 else "*bf16"] + ["i32"] * 8
    names = qg._k_qgemm.arg_names
    sig = {n: "constexpr" if n in cx else types[i] for i, n in enumerate(names)}
    # pointers 16-byte aligned, N, K, RS, KS multiples of 16 (as the Llama shapes); M, GROUP_M not
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n in ("N", "K", "RS", "KS")}
    return triton.compile(ASTSource(qg._k_qgemm, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.warps, num_stages=cfg.stages))


def _raw_format(qt: QType):
    """qgemm._operands' constexprs and pointer types for GGUF blocks, without tensors."""
    info = QTYPE_INFO[qt]
    if qt in qg._G32:
        bits, off, has_min, qh, qs = qg._G32[qt]
        return dict(FMT=0, TS=info.type_size, BITS=bits, OFF=off, HAS_MIN=has_min, QH=qh, QS=qs), \
            ["*u16", "*fp16", "*u8", "*u8"]
    wide = qt in (QType.Q4_K, QType.Q5_K)
    return dict(FMT=2 if wide else 3, TS=info.type_size, BITS=0, OFF=0, HAS_MIN=0,
                QH=16 if qt == QType.Q5_K else -1, QS=0), ["*i32" if wide else "*u16", "*fp16", "*u8", "*u8"]


def loop_mix(sass: str) -> Counter:
    """Opcodes of the last backward branch's body (the k loop)."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    back = [(i, int(m.group(1), 16)) for i, ln in enumerate(lines)
            if (m := re.search(r"@!?U?P\w+\s+BRA\s+0x([0-9a-f]+)", ln)) and int(m.group(1), 16) < addr[i]]
    end, start = back[-1]
    ops = Counter()
    for ln in lines[addr.index(start):end + 1]:
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", ln)
        if m:
            ops[m.group(1)] += 1
    return ops


def ptxas(k):
    """(ptxas -v output, SASS) of a compiled kernel, built for sm_90a with Triton's own tools."""
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        open(ptx, "w").write(k.asm["ptx"])
        r = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--gpu-name=sm_90a", ptx, "-o", cubin],
                           capture_output=True, text=True)
        return r.stderr, subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin],
                                        capture_output=True, text=True).stdout


def report(spec: str, qt: QType, packed: bool, cfg: qg.Cfg) -> None:
    k = build(qt, packed, cfg)
    err, sass = ptxas(k)
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores", err)
    n = sum(loop_mix(sass).values())
    mma = cfg.bm * cfg.bn * cfg.bk / 2048
    print(f"{spec:40} regs {regs.group(1) if regs else '?':>4} spill {spill.group(1) if spill else '?':>4} "
          f"smem {k.metadata.shared:>6} loop {n:5} instr/weight {n * 32 * cfg.warps / (cfg.bn * cfg.bk):5.2f} "
          f"mma/issue {mma / (n * cfg.warps / 4):4.2f} {'SER' if 'C7515' in err else ''}", flush=True)


def main() -> None:
    for spec in sys.argv[1:]:
        name, cfgs = spec.split(":")
        qt, packed = QType[name.rstrip("p")], name.endswith("p")
        if cfgs == "table":
            todo = dict.fromkeys(qg.fit(qg.Cfg(r[0], r[1], r[2], r[3], 1, r[4], r[5]), qt, 4096)
                                 for rows in qg._TABLE.values() for r in rows)
        else:
            todo = [qg.Cfg(*(int(v) for v in cfgs.split(",")))]
        for cfg in todo:
            report(f"{name}:{','.join(map(str, cfg))}", qt, packed, cfg)


if __name__ == "__main__":
    main()
