"""The CUDA backend against the all-CPU run on real weights (marker gpu; skipped without a GPU).

SmolLM2-135M-Instruct Q4_1: the whole file from ~/.cache/lstream/models, or, where only part of
it could travel to the GPU machine, its first 12 layers (tools/synth_model.py truncate_gguf) from
$LSTREAM_SMOL. Pass: 64 greedy tokens identical, or the final logits (same inputs) NMSE <= 1e-4.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_CANDIDATES = [os.environ.get("LSTREAM_SMOL", ""),
               str(Path.home() / ".cache/lstream/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
               ".devcarry/smollm2-12l.gguf"]


def _model_path() -> str:
    for p in _CANDIDATES:
        if p and Path(p).exists():
            return p
    pytest.skip("SmolLM2 GGUF not found")


def _run(ngl, policy, prompt, n_gen=64, ub=512, device=True, ref_gen=None):
    from lstream.backends.cuda import CUDABackend
    from lstream.api import Model
    from lstream.core.sampling import Sampler, SamplerConfig
    from lstream.loaders.model_file import load_model

    dev = CUDABackend(policy=policy) if device else None
    m = Model(load_model(_model_path()), n_gpu_layers=ngl, device_backend=dev, n_ubatch=ub, n_ctx=1024,
              load_tokenizer=False)
    gen = list(m.generate_tokens(list(prompt), n_gen, Sampler(SamplerConfig(temp=0.0)), stop_at_eos=False))
    m.reset()
    final = m.eval(list(prompt) + list(ref_gen or gen)[:-1])  # the same inputs for both sides
    stats = dev.stream_counters() if dev else None
    m.close()
    return gen, final, stats


@pytest.fixture(scope="module")
def cpu_ref():
    prompt = np.random.default_rng(1).integers(100, 40000, 512).tolist()
    gen, final, _ = _run(0, None, prompt, device=False)
    return prompt, gen, final


def _nmse(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("ngl,policy", [(999, "threshold"), ("half", "threshold"), (0, "always")])
def test_matches_cpu(cpu_ref, ngl, policy):
    from lstream.core.policy import make_policy
    from lstream.loaders.model_file import load_model
    if ngl == "half":  # mixed: half the layers resident, the rest streamed (whatever the file's depth)
        ngl = load_model(_model_path()).config.n_layer // 2
    prompt, ref_gen, ref_final = cpu_ref
    gen, final, stats = _run(ngl, make_policy(policy, 32), prompt, ref_gen=ref_gen)
    nmse = _nmse(final, ref_final)
    same = sum(a == b for a, b in zip(gen, ref_gen))
    print(f"-ngl {ngl} {policy}: {same}/64 tokens identical, final logits NMSE {nmse:.2e}, stream {stats}")
    assert gen == ref_gen or nmse <= 1e-4, (same, nmse)
    if ngl < 999:
        assert stats is not None and stats.bytes_streamed > 0


def _greedy_with_and_without_graphs(prompt, n: int, model_kw: dict, backend_kw: dict, counters) -> dict:
    """{cuda_graphs: (greedy tokens, logits of one more step, *counters(model.runner.replay))}."""
    from lstream.backends.cuda import CUDABackend
    from lstream.api import Model
    from lstream.core.sampling import Sampler, SamplerConfig
    from lstream.loaders.model_file import load_model
    outs = {}
    for graphs in (True, False):
        dev = CUDABackend(cuda_graphs=graphs, **backend_kw)
        m = Model(load_model(_model_path()), device_backend=dev, load_tokenizer=False, **model_kw)
        gen = list(m.generate_tokens(prompt, n, Sampler(SamplerConfig(temp=0.0)), stop_at_eos=False))
        outs[graphs] = (gen, m.eval([gen[-1]]), *counters(m.runner.replay))
        m.close()
    return outs


def test_cuda_graph_decode_identical():
    """All resident: decode steps replayed from CUDA graphs give the tokens and logits of the same
    static steps run eagerly (--no-cuda-graphs); 64 steps from position 220 pass 256 with one graph
    (attention reads each position on the device: no span buckets)."""
    prompt = np.random.default_rng(2).integers(100, 40000, 220).tolist()
    outs = _greedy_with_and_without_graphs(prompt, 64, dict(n_gpu_layers=999, n_ctx=1024), {},
                                           lambda st: (st.replays, st.captures))
    (g1, l1, replays, captures), (g0, l0, r0, c0) = outs[True], outs[False]
    print(f"graphs: {replays} replays, {captures} captures; max |logit diff| {np.abs(l1 - l0).max():.3g}")
    assert replays >= 60 and captures == 1 and r0 == c0 == 0
    assert g1 == g0
    assert _nmse(l1, l0) <= 1e-10


def test_mixed_decode_segment_graph_identical():
    """-ngl 6 with LayerSplit(2): the CPU computes 2 host layers, the copy engine streams the rest,
    the resident layers replay from a graph between them and the streamed head; same tokens and
    logits as the same static segment run eagerly."""
    from lstream.core.policy import LayerSplit

    prompt = np.random.default_rng(3).integers(100, 40000, 100).tolist()
    outs = _greedy_with_and_without_graphs(prompt, 32, dict(n_gpu_layers=6, n_ctx=512), dict(policy=LayerSplit(2)),
                                           lambda st: (st.replays, st.segment_runs))
    (g1, l1, replays, seg1), (g0, l0, _, seg0) = outs[True], outs[False]
    print(f"segment graphs: {replays} replays of {seg1} segment steps; max |logit diff| {np.abs(l1 - l0).max():.3g}")
    assert seg1 == seg0 == 32 and replays == 32
    assert g1 == g0 and _nmse(l1, l0) <= 1e-10
