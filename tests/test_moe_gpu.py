"""Mixtures of experts on the real CUDA backend (marker gpu; skipped without a GPU): the CPU, experts
resident on the GPU, every layer's experts in host memory (--cpu-moe) and the first layer's
(--n-cpu-moe 1) give the same greedy tokens (fp32 compute) and close logits (bf16). The bf16 test body also runs on
the fake device (the CUDA backend's code on CPU tensors; the greedy one is test_moe_device.py's), so
they are known to hold before a GPU session runs them."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lstream.api import Model  # noqa: E402
from lstream.core.policy import BatchThreshold  # noqa: E402
from lstream.loaders.model_file import load_model  # noqa: E402
from lstream.tools import tiny_moe  # noqa: E402

GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA device")])
KINDS = [GPU, "fake"]
PLACEMENTS = ({}, {"cpu_moe": True}, {"n_cpu_moe": 1}, {"overrides": [("exps", "cpu")]})


def _device(kind: str, dtype: str):
    if kind == "cuda":
        from lstream.backends.cuda import CUDABackend
        return CUDABackend(policy=BatchThreshold(), dtype=dtype)
    from fake_device import FakeDeviceBackend
    return FakeDeviceBackend(BatchThreshold(), dtype=dtype)


@pytest.fixture(scope="module", params=tiny_moe.ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    d, ids, ref = tiny_moe.write(arch, tmp_path_factory.mktemp(arch), n_tokens=40, gguf_types=("Q8_0",))
    return arch, d / f"{arch}-Q8_0.gguf", ids


def _run(path, ids, dev=None, **kw):
    m = Model(load_model(path), n_gpu_layers=99 if dev else 0, device_backend=dev, device=None, n_ctx=128,
              n_ubatch=16, load_tokenizer=False, **kw)
    try:
        gen = list(m.generate_tokens(ids[:24], 12, stop_at_eos=False))
        m.reset()
        logits = m.eval(ids[:24] + gen[:-1], logits="all")
        return gen, logits
    finally:
        m.close()


@pytest.mark.parametrize("kind", [GPU])  # on the fake device: test_moe_device.py's test_greedy_tokens_equal_cpu
def test_paths_give_the_cpus_greedy_tokens(tiny, kind):
    arch, path, ids = tiny
    want, ref = _run(path, ids)
    for kw in PLACEMENTS:
        gen, logits = _run(path, ids, _device(kind, "fp32"), **kw)
        assert gen == want, (arch, kw)
        nmse = float(((logits - ref) ** 2).sum() / (ref ** 2).sum())
        assert nmse < 1e-8, (arch, kw, nmse)


@pytest.mark.parametrize("kind", [GPU])  # on the fake device: tests/test_hop_replay.py, test_expert_share.py
def test_expert_share_close_to_the_cpu(tiny, kind, monkeypatch):
    """--moe-share: of each token's routed experts in a host-expert decode layer the GPU fetches and
    computes some: by its fetch kernel (zero-copy reads of the pinned arena, ids from the device's
    router) or, with LSTREAM_SHARE_FETCH=0, by the host's DMA on the copy stream and a flag."""
    from lstream.backends.cuda import hop_share
    arch, path, ids = tiny
    _, ref = _run(path, ids)
    for share, fetch in ((1, True), (2, True), (2, False)):
        monkeypatch.setattr(hop_share, "FETCH", fetch)
        dev = _device(kind, "bf16")  # (the shared experts run moe_kernels, as the default dtype does)
        dev.moe_share = share
        m = Model(load_model(path), n_gpu_layers=99, device_backend=dev, device=None, n_ctx=128, n_ubatch=16,
                  load_tokenizer=False, cpu_moe=True)
        try:
            gen = list(m.generate_tokens(ids[:24], 12, stop_at_eos=False))
            r = m.runner.replay
            hop = next(iter(r.hops._steps.values()), (None,) * 6)[4]
            info = (arch, share, dev._use_moe_kernels(), r.hops.runs, r.segment_runs,
                    hop is not None and [lay is not None for lay in hop.layers])
            if arch != "qwen2moe":  # (its shared expert keeps its MoE ops the host's)
                assert hop is not None and hop.experts_computed > 0, info
                assert all(lay[2] == fetch for lay in hop.layers if lay), info
            m.reset()
            logits = m.eval(ids[:24] + gen[:-1], logits="all")
        finally:
            m.close()
        nmse = float(((logits - ref) ** 2).sum() / (ref ** 2).sum())
        assert nmse < 1e-3, (arch, share, fetch, nmse)  # bf16 as test_bf16_close_to_the_cpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_shares_half_the_experts(tiny):
    """A model built as the CLI and the API build it (Options' defaults: --moe-share auto) replays
    host-expert decode as one graph with half of each token's routed experts computed on the GPU."""
    arch, path, ids = tiny
    _, ref = _run(path, ids)
    m = Model(load_model(path), n_gpu_layers=99, device="cuda", n_ctx=128, n_ubatch=16, load_tokenizer=False,
              cpu_moe=True)
    try:
        gen = list(m.generate_tokens(ids[:24], 12, stop_at_eos=False))
        hop = next(iter(m.runner.replay.hops._steps.values()), (None,) * 6)[4]
        k = next(nd.params["top_k"] for nd in m.graph.nodes if "top_k" in nd.params)
        if arch != "qwen2moe":  # (its shared expert keeps its MoE ops the host's)
            assert hop is not None and {lay[0] for lay in hop.layers if lay} == {k // 2}, arch
            assert hop.experts_computed > 0 and all(lay[2] for lay in hop.layers if lay)  # (the fetch kernel)
        m.reset()
        logits = m.eval(ids[:24] + gen[:-1], logits="all")
    finally:
        m.close()
    assert float(((logits - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-3, arch


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_close_to_the_cpu(tiny, kind):
    arch, path, ids = tiny
    ref = None
    for dev, kw in ((None, {}), (_device(kind, "bf16"), {}), (_device(kind, "bf16"), {"cpu_moe": True})):
        m = Model(load_model(path), n_gpu_layers=99 if dev else 0, device_backend=dev, device=None, n_ctx=128,
                  n_ubatch=16, load_tokenizer=False, **kw)
        try:
            logits = m.eval(ids[:35], logits="all")
        finally:
            m.close()
        if ref is None:
            ref = logits
            continue
        nmse = float(((logits - ref) ** 2).sum() / (ref ** 2).sum())
        assert nmse < 1e-3, (arch, kw, nmse)  # bf16 matmul inputs (the CPU: int16 activations)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qwen3_30b_shapes_two_layers(tmp_path):
    """Real Qwen3-30B-A3B layer shapes (2 layers, synthetic Q4_K): resident and --cpu-moe against the CPU,
    a 512-token prompt (experts uploaded per ubatch) and decode steps (experts on the CPU)."""
    from lstream.tools.synth_model import write_model
    path = write_model(tmp_path / "q3moe-2l.gguf", "qwen3-30b-a3b", "Q4_K", layers=2)
    prompt = np.random.default_rng(0).integers(0, 151000, 512).tolist()
    outs = {}
    for name, kw in (("cpu", {}), ("resident", {"n_gpu_layers": 99}), ("cpu-moe", {"n_gpu_layers": 99, "cpu_moe": True})):
        dev = None if name == "cpu" else _device("cuda", "bf16")
        m = Model(load_model(path), device_backend=dev, device=None, n_ctx=1024, n_ubatch=512, load_tokenizer=False, **kw)
        try:
            m.eval(prompt)
            outs[name] = np.stack([m.eval([t]) for t in (11, 12, 13, 14)])
        finally:
            m.close()
    for name in ("resident", "cpu-moe"):
        ref = outs["cpu"]
        assert float(((outs[name] - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-3, name


@pytest.mark.parametrize("kind", KINDS)
def test_static_prompt_matches_eager(tiny, kind, monkeypatch):
    """Resident experts: a prompt's ubatches of a size seen before run in static form (replayed from
    CUDA graphs on a GPU: routing, the sort by expert and the grouped GEMMs captured), bf16; their
    logits and the decode steps after them against the same model run eagerly (NMSE <= 1e-3: the static attention kernel
    against SDPA)."""
    arch, path, ids = tiny
    prompt = (ids * 4)[:48]  # three ubatches of 16

    def run(static: bool):
        monkeypatch.setenv("LSTREAM_PREFILL_GRAPHS", "1" if static else "0")
        dev = _device(kind, "bf16")
        if kind == "fake":
            dev.static_prefill = static
        m = Model(load_model(path), n_gpu_layers=99, device_backend=dev, device=None, n_ctx=128, n_ubatch=16,
                  load_tokenizer=False)
        try:
            outs = []
            for _ in range(2):
                m.reset()
                outs.append(np.array(m.eval(prompt)))
            outs += [np.array(m.eval([t])) for t in (5, 6)]
            return outs, m.runner.replay.prefill_runs
        finally:
            m.close()
    eager, runs0 = run(False)
    static, runs = run(True)
    assert runs0 == 0 and runs == 1 + 3, (arch, runs)
    for a, b in zip(static, eager):
        assert float(((a - b) ** 2).sum() / (b ** 2).sum()) < 1e-3, arch


@pytest.mark.parametrize("kind", KINDS)
def test_expert_cache_gives_the_cpus_greedy_tokens(tiny, kind):
    """--cpu-moe with --expert-cache (fp32): hits computed on the device from the cache's slots, the
    misses on the CPU, the same greedy tokens as the CPU alone; the cache found some experts."""
    arch, path, ids = tiny
    want, _ = _run(path, ids)
    if kind == "cuda":
        from lstream.backends.cuda import CUDABackend
        dev = CUDABackend(policy=BatchThreshold(), dtype="fp32", expert_cache_gib=0.05)
    else:
        from fake_device import FakeDeviceBackend
        dev = FakeDeviceBackend(BatchThreshold(), expert_cache_gib=0.05)
    m = Model(load_model(path), n_gpu_layers=99, device_backend=dev, device=None, n_ctx=128, n_ubatch=16,
              load_tokenizer=False, cpu_moe=True)
    try:
        gen = list(m.generate_tokens(ids[:24], 12, stop_at_eos=False))
        assert gen == want, arch
        assert dev.expert_cache.hits > 0
    finally:
        m.close()


@pytest.mark.parametrize("kind", [GPU])  # on the fake device: tests/test_hop_replay.py
def test_hops_in_one_graph_give_the_segment_paths_tokens(tiny, kind, monkeypatch):
    """--cpu-moe decode replayed as one graph with its expert hops served through the mailbox (stream
    memory operations on pinned flags) gives the segment path's greedy tokens and logits."""
    from lstream.core import hop_replay
    arch, path, ids = tiny
    out = {}
    for on in (True, False):
        monkeypatch.setattr(hop_replay, "HOP_GRAPHS", on)
        m = Model(load_model(path), n_gpu_layers=99, device_backend=_device(kind, "fp32"), device=None,
                  n_ctx=128, n_ubatch=16, load_tokenizer=False, cpu_moe=True)
        try:
            gen = list(m.generate_tokens(ids[:24], 12, stop_at_eos=False))
            r = m.runner.replay
            m.reset()
            out[on] = gen, m.eval(ids[:24] + gen[:-1], logits="all"), r.hops.runs, r.segment_runs
        finally:
            m.close()
    (gen, logits, runs, segs), (want, ref, runs0, segs0) = out[True], out[False]
    assert gen == want, arch
    assert float(((logits - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-10
    assert runs >= 10 and segs == 0 and runs0 == 0 and segs0 >= 10
