"""A valid model whose activations pass float16's range (real models' outlier features reach
thousands; some families exceed 65504): the 8B layer shapes, every Q4_0 block scale 0.02 and
uniformly random nibbles (tools/synth_model.py --scale 0.02), two layers. Every path computes it
without error and agrees on the greedy tokens; a path that does overflow (the fake device forced
to float16) reports where, in one line, instead of crashing inside a kernel."""
from __future__ import annotations

import numpy as np
import pytest

from fake_device import FakeDeviceBackend
from lstream.api import Model
from lstream.core.errors import NonFiniteError
from lstream.core.executor import RunContext
from lstream.core.policy import Always, LayerSplit, Never
from lstream.loaders.model_file import load_model
from lstream.tools.synth_model import write_model

N_LAYER = 2
PROMPT = list(range(100, 116))
N_GEN = 6
F16_MAX = 65504.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("large") / "l8b-v4k-large.gguf", "llama3-8b-v4k", "Q4_0",
                       layers=N_LAYER, seed=3, scale=0.02)


def _greedy(m: Model) -> list[int]:
    logits = m.eval(PROMPT)
    toks = []
    for _ in range(N_GEN):
        toks.append(int(np.argmax(logits)))
        logits = m.eval([toks[-1]])
    return toks


@pytest.fixture(scope="module")
def cpu_tokens(model_path):
    m = Model(load_model(model_path), device=None, n_ctx=64, load_tokenizer=False)
    try:
        # the residual stream after layer 0 (op by op, the node's value itself) passes 65504
        plan = m.plan(len(PROMPT))
        ctx = RunContext(np.asarray(PROMPT, np.int32), np.arange(len(PROMPT)), 0, m.kv, m.residency)
        resid = next(n.id for n in m.graph.nodes if n.name == "blk.0.ffn_residual")
        vals: dict = {}
        with m.executor.session(plan, ctx):
            m.executor.run_part(plan, ctx, vals, stop=resid + 1)
        peak = float(np.abs(vals[resid]["cpu"]).max())
        assert np.isfinite(peak) and peak > F16_MAX, peak
        m.reset()
        return _greedy(m)
    finally:
        m.close()


@pytest.mark.slow
@pytest.mark.parametrize("ngl,policy", [(0, Always()), (N_LAYER + 1, Never()), (1, LayerSplit(1)),
                                        (0, LayerSplit(N_LAYER, share=0.5))])
def test_fake_device_bf16_agrees_with_cpu(model_path, cpu_tokens, ngl, policy):
    """The device backend's own code in bf16 (its default dtype) on CPU tensors: streamed, resident
    and mixed decode give the CPU's greedy tokens."""
    m = Model(load_model(model_path), n_gpu_layers=ngl, device_backend=FakeDeviceBackend(policy, dtype="bf16"),
              n_ctx=64, load_tokenizer=False)
    try:
        assert _greedy(m) == cpu_tokens
    finally:
        m.close()


@pytest.mark.slow
def test_float16_overflow_is_reported(model_path):
    """Forced to float16 the device's matmul outputs overflow: one NonFiniteError naming the node,
    layer and backend where the values were first seen, not a ZeroDivisionError from a kernel."""
    m = Model(load_model(model_path), n_gpu_layers=1, device_backend=FakeDeviceBackend(LayerSplit(1), dtype="fp16"),
              n_ctx=64, load_tokenizer=False)
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite values .* after blk\.\d+\.\w+ .*layer \d+, computed on"):
            _greedy(m)
    finally:
        m.close()


@pytest.mark.gpu
@pytest.mark.parametrize("ngl,policy", [(99, None), (0, Always()), (1, LayerSplit(1)), (1, None), (0, LayerSplit(1)),
                                        (0, LayerSplit(N_LAYER, share=0.45))])
def test_gpu_agrees_with_cpu(model_path, cpu_tokens, ngl, policy):
    """On the GPU (bf16 matmul inputs, fp32 residual and GEMV sums): resident, streamed and every
    mixed split decode the large model to the CPU's greedy tokens."""
    from lstream.core.policy import BatchThreshold
    m = Model(load_model(model_path), n_gpu_layers=ngl, policy=policy or BatchThreshold(32), n_ctx=64,
              load_tokenizer=False)
    try:
        assert _greedy(m) == cpu_tokens
    finally:
        m.close()
