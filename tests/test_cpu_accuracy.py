"""Issue 3 acceptance: the CPU fast paths (quantized-activation matmuls, stacked projections, numba
rope/attention) leave SmolLM2's perplexity within 0.2% of the reference path (dequantize + float32
matmul for every quantized weight)."""
from __future__ import annotations

import numpy as np

from lstream.tools.accuracy_check import ppl, run

N_TOKENS = 512


def test_fast_path_perplexity_matches_reference(smollm2, text_tokens):
    ids = text_tokens[:N_TOKENS]
    assert len(ids) == N_TOKENS
    ref = run(smollm2, ids, fast_kinds=set())
    fast = run(smollm2, ids)
    p_ref, p_fast = ppl(ref, ids), ppl(fast, ids)
    top1 = (ref.argmax(-1) == fast.argmax(-1)).mean()
    print(f"\nppl reference {p_ref:.4f} fast {p_fast:.4f} ({p_fast / p_ref - 1:+.4%}) top-1 agreement {top1:.4f}")
    assert abs(p_fast / p_ref - 1) < 0.002
    assert top1 >= 0.98
    assert np.isfinite(fast).all()


def test_decode_steps_match_prefill(smollm2, text_tokens):
    """Decode (1 token: serial quantization inside the matmul, serial attention/rope kernels) agrees
    with the same positions computed in one prefill ubatch (parallel kernels)."""
    ids = text_tokens[:24]
    smollm2.reset()
    whole = smollm2.eval(ids, logits="all")
    smollm2.reset()
    smollm2.eval(ids[:16])
    steps = np.stack([smollm2.eval([t]).reshape(-1) for t in ids[16:]])
    smollm2.reset()
    np.testing.assert_allclose(steps, whole[16:], rtol=0, atol=1e-3 * np.abs(whole).max())


def test_int16_kernels_perplexity_matches_reference(smollm2, text_tokens, monkeypatch):
    """Prefill from 32 tokens now runs dequantize + sgemm (the reference path itself), so the first
    test no longer exercises the int16-activation kernels on 512 tokens; force them (they still run
    every decode step and ubatch below 32 tokens)."""
    from lstream.tools import accuracy_check as A

    monkeypatch.setattr(A, "_FAST", 1 << 62)  # gemm_min_tokens of the fast path: never sgemm
    ids = text_tokens[:N_TOKENS]
    ref = run(smollm2, ids, fast_kinds=set())
    fast = run(smollm2, ids)
    p_ref, p_fast = ppl(ref, ids), ppl(fast, ids)
    top1 = (ref.argmax(-1) == fast.argmax(-1)).mean()
    print(f"\nint16 kernels: ppl reference {p_ref:.4f} fast {p_fast:.4f} ({p_fast / p_ref - 1:+.4%}) top-1 {top1:.4f}")
    assert abs(p_fast / p_ref - 1) < 0.002
    assert top1 >= 0.98
