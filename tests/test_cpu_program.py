"""Compiled CPU decode (backends/cpu/program.py): a run of a split's nodes in one numba call must
compute what the same nodes compute op by op (the same kernels in the same order), for every op the
architectures use: SmolLM2 (the real model), and tiny Qwen2 (biases), Qwen3 (q/k norms) and Gemma 3
(post norms, GEGLU, sliding window, embedding scale) checkpoints quantized to Q8_0 at load.

Bit-identical when run alone.  After the rest of the suite, one run saw the 20-token prompts
(op by op in both runs) differ by up to 3e-5 relative between two evaluations, before any program
ran: summation order in the prefill kernels (numba may reuse a kernel compiled for another array
layout; BLAS).  So the check is the same greedy token at every step and logits within NMSE 1e-7,
far below what a wrong op gives (~1e-2 and up)."""
from __future__ import annotations

import numpy as np
import pytest

import lstream
from lstream.backends.cpu.program import Program
from lstream.core.executor import RunContext

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _use_programs(model, on: bool) -> None:
    model.cpu.programs = on
    model.executor._compiled.clear()
    model.body_executor._compiled.clear()


def _decode(model, prompt, n: int, on: bool, n_tok: int = 1):
    """Prompt, then n steps of n_tok tokens (greedy first token, then fixed ones); every step's logits."""
    _use_programs(model, on)
    model.reset()
    outs = [model.eval(prompt)]
    tok = int(np.argmax(outs[-1]))
    for i in range(n):
        toks = [tok] + [(tok + 7 * j) % model.config.vocab_size for j in range(1, n_tok)]
        outs.append(model.eval(toks, logits="all" if n_tok > 1 else "last"))
        tok = int(np.argmax(outs[-1].reshape(-1, outs[-1].shape[-1])[-1]))
    return outs


def _same(ref, got):
    for a, b in zip(ref, got):
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
        nmse = float(((a - b) ** 2).sum() / (a ** 2).sum())
        assert nmse <= 1e-7, nmse


def _fused_nodes(model) -> int:
    n = 0
    for _, units in model.executor._compiled.values():
        n += sum(len(u.nodes) for u in (units or []) if isinstance(u, Program))
    return n


@pytest.fixture(scope="module")
def smol(smollm2_path):
    m = lstream.load(str(smollm2_path), n_ctx=256, load_tokenizer=False, n_threads=2)
    yield m
    m.close()


@pytest.mark.parametrize("n_tok", [1, 3])
def test_smollm2_decode_equals_op_by_op(smol, n_tok):
    prompt = list(range(100, 140))
    ref = _decode(smol, prompt, 12, False, n_tok)
    got = _decode(smol, prompt, 12, True, n_tok)
    # every node after the embedding lookup ran inside one program per step
    assert _fused_nodes(smol) == len(smol.graph.nodes) - 1
    _same(ref, got)


def test_partial_runs_fall_back_where_a_program_straddles(smol):
    """A run stopped inside a program (start/stop, as the CUDA segment path runs a plan) goes op by op
    there and still makes the same logits as the whole run."""
    _use_programs(smol, True)
    plan, ex = smol.plan(1), smol.executor
    outs = []
    for cut in (None, 5, 200, 400):
        smol.reset()
        smol.eval(list(range(10, 30)))
        ctx = RunContext(np.array([77], np.int32), np.array([20]), 20, smol.kv, smol.residency)
        smol.cpu.begin_run(plan, ctx)
        out: list = []
        if cut is None:
            for _ in ex.steps(plan, ctx, out):
                pass
        else:
            vals: dict = {}
            for _ in ex.steps(plan, ctx, [], values=vals, stop=cut):
                pass
            for _ in ex.steps(plan, ctx, out, values=vals, start=cut):
                pass
        smol.cpu.end_run()
        outs.append(out[0])
    _same(outs[:1] * 3, outs[1:])


def _tiny(arch: str):
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, initializer_range=0.1)
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))
    if arch == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    cfg = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=32, sliding_window=8,
                                        query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh")
    return transformers.Gemma3ForCausalLM(cfg)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_tiny_architectures_equal_op_by_op(arch, tmp_path):
    torch.manual_seed(0)
    _tiny(arch).save_pretrained(tmp_path)
    m = lstream.load(str(tmp_path), quantize="q8_0", load_tokenizer=False, n_ctx=128)
    try:
        prompt = list(range(3, 23))  # 20 tokens, then 16 steps: past Gemma's window of 8
        ref = _decode(m, prompt, 16, False)
        got = _decode(m, prompt, 16, True)
        assert _fused_nodes(m) == len(m.graph.nodes) - 1  # all but the embedding lookup
        _same(ref, got)
    finally:
        m.close()


def test_program_takes_plain_arrays(smol):
    """program_kernels.run takes only ndarrays and integers (typed Lists compiled their methods in
    every new process, seconds before the first token); its tables hold [address, shape] per array."""
    from numba import types
    from lstream.backends.cpu import program_kernels as P
    from lstream.backends.cpu.program import _table
    _decode(smol, [1, 2, 3], 1, True)
    assert P.run.signatures
    for sig in P.run.signatures:
        assert all(isinstance(t, (types.Array, types.Integer)) for t in sig), sig
    a = np.zeros((3, 4), np.float32)
    np.testing.assert_array_equal(_table([a], 2, np.float32), [[a.ctypes.data, 3, 4]])
    for bad in (a[:, ::2], a.astype(np.float64), a.reshape(-1)):  # strided, wrong dtype, wrong ndim
        with pytest.raises(TypeError):
            _table([bad], 2, np.float32)
