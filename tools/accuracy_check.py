"""Accuracy of the CPU fast paths against the float reference path (dequantize + float32 matmul).

    python -m lstream.tools.accuracy_check [--model PATH] [--tokens 512] [--per-op] [--ablate]

Prints the perplexity of the first N tokens of tests/data/declaration.txt with
  - the reference path: every quantized matmul dequantizes a tile and calls float32 sgemm
    (the CPU backend's gemm_min_tokens = 1),
  - the fast path (what runs by default),
and, with --per-op, for each matmul kind (q, k, v, o, gate, up, down, output) the relative error
||fast - ref|| / ||ref|| of its output on the same inputs (collected during the reference run, so
errors do not compound), and with --ablate the perplexity when only that kind uses the fast path.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import numpy as np

from lstream.backends import cpu as C
from lstream.core.ops import Op

DEFAULT_MODEL = os.path.expanduser("~/.cache/lstream/models/SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                    "declaration.txt")
_REF = 1  # gemm_min_tokens of the reference path
_FAST = None  # of the fast path; None: the backend's own


def nll(logits: np.ndarray, ids) -> np.ndarray:
    lg = logits.astype(np.float64)
    mx = lg.max(-1, keepdims=True)
    lse = (np.log(np.exp(lg - mx).sum(-1, keepdims=True)) + mx)[:, 0]
    return lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]


def ppl(logits, ids) -> float:
    return float(np.exp(nll(logits, ids).mean()))


def kind(node) -> str:
    return node.name.rsplit(".", 1)[-1]


def run(model, ids, fast_kinds=None, collect=None):
    """Eval `ids` (all logits). fast_kinds None: the fast path everywhere; a set: only those matmul
    kinds use the fast path, the rest the reference path. collect: dict kind -> list of rel errors
    (the run itself uses the reference path everywhere)."""
    orig = C.CPUBackend.compute
    own = model.cpu.gemm_min_tokens
    fast = own if _FAST is None else _FAST

    def compute(self, node, inputs, ctx):
        if node.op is not Op.MATMUL:
            return orig(self, node, inputs, ctx)
        k = kind(node)
        if collect is not None:
            pending = getattr(self, "_pending", {})
            pending.clear()  # stacked q|k|v, gate|up: recompute each one on both paths
            self.gemm_min_tokens = fast
            y_fast = orig(self, node, inputs, ctx)
            pending.clear()
            self.gemm_min_tokens = _REF
            y_ref = orig(self, node, inputs, ctx)
            pending.clear()
            collect[k].append(float(np.linalg.norm(y_fast - y_ref) / max(np.linalg.norm(y_ref), 1e-30)))
            return y_ref
        self.gemm_min_tokens = fast if (fast_kinds is None or k in fast_kinds) else _REF
        return orig(self, node, inputs, ctx)

    C.CPUBackend.compute = compute
    try:
        model.reset()
        return model.eval(ids, logits="all")
    finally:
        C.CPUBackend.compute = orig
        model.cpu.gemm_min_tokens = own
        model.reset()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--per-op", action="store_true")
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--hf", action="store_true", help="also compare with transformers (loads the GGUF)")
    a = ap.parse_args(argv)
    import lstream
    m = lstream.load(a.model, n_ubatch=a.ubatch)
    ids = m.tokenize(open(TEXT).read())[: a.tokens]
    t0 = time.perf_counter()
    ref = run(m, ids, fast_kinds=set())
    t1 = time.perf_counter()
    fast = run(m, ids)
    t2 = time.perf_counter()
    p_ref, p_fast = ppl(ref, ids), ppl(fast, ids)
    print(f"tokens {len(ids)}  ubatch {a.ubatch}")
    print(f"reference path ppl {p_ref:.4f}  ({t1 - t0:.1f} s)")
    print(f"fast path      ppl {p_fast:.4f}  ({t2 - t1:.1f} s)  rel {p_fast / p_ref - 1:+.4%}  "
          f"top-1 agreement {(ref.argmax(-1) == fast.argmax(-1)).mean():.4f}")
    if a.hf:
        import torch
        from transformers import AutoModelForCausalLM
        d, f = os.path.split(a.model)
        hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
        with torch.no_grad():
            h = hf(torch.tensor([ids])).logits[0].numpy()
        print(f"transformers   ppl {ppl(h, ids):.4f}  top-1 fast/hf {(fast.argmax(-1) == h.argmax(-1)).mean():.4f}"
              f"  ref/hf {(ref.argmax(-1) == h.argmax(-1)).mean():.4f}")
    if a.per_op:
        errs = defaultdict(list)
        run(m, ids, collect=errs)
        print("per-matmul relative error ||fast-ref||/||ref|| (mean, max over layers):")
        for k, v in errs.items():
            print(f"  {k:8s} mean {np.mean(v):.2e}  max {np.max(v):.2e}  (n={len(v)})")
    if a.ablate:
        kinds = ["q", "k", "v", "o", "gate", "up", "down", "output"]
        print("ppl with only one matmul kind on the fast path:")
        for k in kinds:
            p = ppl(run(m, ids, fast_kinds={k}), ids)
            print(f"  {k:8s} ppl {p:.4f}  rel {p / p_ref - 1:+.4%}")


if __name__ == "__main__":
    main()
