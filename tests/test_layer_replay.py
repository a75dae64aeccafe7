"""Layer-major prompts in static form (core/layer_replay.py): each (layer, ubatch) from static
inputs, a host layer's K/V in a device stand-in filled once per layer and written back once, the
ring driven around the layers. On the fake device (graphs off: the static form runs eagerly,
float32, copies that run late unless waited for) it must give the eager layer-major path's logits,
host K/V and decode (NMSE <= 1e-8), at depth and with a remainder ubatch, and stream each layer
once per prompt."""
from __future__ import annotations

import numpy as np
import pytest

from fake_device import FakeDeviceBackend
from lstream.api import Model
from lstream.core.policy import Always, BatchThreshold
from lstream.loaders.model_file import load_model
from lstream.tools.synth_model import write_model

PROMPT = list(range(300, 348))  # three ubatches of 16
MORE = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]  # 16 + a remainder of 3


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("lr") / "tiny.gguf", "tiny", "Q4_0", layers=4, seed=5)


def _nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def _model(path, ngl, static: bool, policy=None):
    be = FakeDeviceBackend(policy or Always(), n_slots=2)
    be.static_prefill = static
    return Model(load_model(path), n_gpu_layers=ngl, device_backend=be, n_ubatch=16, n_ctx=128,
                 load_tokenizer=False, device=None)


def _session(m):
    """Two prompts (the second one static where the first was seen), the second continued at depth
    (past K/V read from the host), one decode step; the host K/V of every layer after it."""
    m.reset()
    m.eval(PROMPT)
    m.reset()
    a = np.array(m.eval(PROMPT))
    b = np.array(m.eval(MORE))
    c = np.array(m.eval([5]))
    kv = [(np.array(s.k[:len(PROMPT) + len(MORE) + 1]), np.array(s.v[:len(PROMPT) + len(MORE) + 1]))
          for s in m.kv.layers if not m.device_backend.owns_kv(s)]
    st = m.device_backend.streamer
    return a, b, c, kv, [e[1] for e in st.log if e[0] == "fill"] if st is not None else []


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("lrq") / "tiny-qwen.gguf", "tiny-qwen", "Q4_0", seed=7)


@pytest.mark.parametrize("ngl", [0, 2, 99], ids=["ngl0", "ngl2", "ngl99"])
def test_static_layer_major_matches_eager(tiny_path, ngl):
    _compare(tiny_path, ngl, 4)


def test_static_layer_major_with_biases(qwen_path):
    """q/k/v biases (Qwen2): the static form runs the same nodes."""
    _compare(qwen_path, 0, 2)


def _compare(path, ngl, n_layer):
    ref = _model(path, ngl, False)
    try:
        want = _session(ref)
    finally:
        ref.close()
    m = _model(path, ngl, True)
    try:
        got = _session(m)
        lr = m.runner.layer_replay
        if ngl == 99:  # nothing streams: not layer-major (resident prompts replay whole, core/replay.py)
            assert lr.runs == 0
        else:
            # prompts 1 and 2 (three ubatches each) and the continuation (16 + 3) ran in static form
            assert lr.runs == 3
        for g, w in zip(got[:3], want[:3]):
            assert _nmse(g, w) < 1e-8
        assert len(got[3]) == len(want[3]) == (0 if ngl == 99 else n_layer - ngl)
        for (gk, gv), (wk, wv) in zip(got[3], want[3]):
            np.testing.assert_allclose(gk, wk, rtol=0, atol=1e-5)
            np.testing.assert_allclose(gv, wv, rtol=0, atol=1e-5)
        # each streamed layer crossed once per prompt, in the same order as the eager path
        assert got[4] == want[4]
        if ngl == 0:
            assert got[4].count(0) == 4  # three prompts and the decode step (Always uploads)
    finally:
        m.close()


def test_layer_major_static_needs_every_block_node_here(tiny_path):
    """A layer split between the CPU and the device keeps the eager path (nothing static)."""
    m = _model(tiny_path, 0, True, policy=BatchThreshold(32))
    try:
        m.eval(PROMPT)  # ubatches of 16 < 32: the CPU computes them, nothing streams
        assert m.runner.layer_replay.runs == 0
    finally:
        m.close()


def test_layout_takes_the_residual_stream_only(tiny_path):
    m = _model(tiny_path, 0, True)
    try:
        plan = m.plan(16)
        lay = m.runner.layer_replay.layout(plan, m.body_executor.graph)
        g = m.body_executor.graph
        assert [x[0] for x in lay] == list(range(4))
        for layer, s, e, x_in, x_out in lay:
            assert g.nodes[x_out].name == f"blk.{layer}.ffn_residual"
            assert g.nodes[x_in].name == ("token_embd" if layer == 0 else f"blk.{layer - 1}.ffn_residual")
    finally:
        m.close()


@pytest.mark.gpu
def test_gpu_layer_graphs_match_eager(monkeypatch, tmp_path):
    """Three layers of the Llama-3-8B shapes streamed (-ngl 0 and 2), three ubatches of 64: the
    third prompt replays every (layer, ubatch) graph; its logits, a continuation at depth and the
    decode steps after it against the eager layer-major path (bf16: NMSE <= 1e-3)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from lstream.backends.cuda import CUDABackend
    path = write_model(tmp_path / "l8b-3l.gguf", "llama3-8b", "Q4_0", layers=3, seed=6)
    prompt = list(range(400, 400 + 3 * 64))

    def run(static: bool, ngl: int):
        monkeypatch.setenv("LSTREAM_LAYER_GRAPHS", "1" if static else "0")
        m = Model(load_model(path), n_gpu_layers=ngl, device_backend=CUDABackend(Always()), n_ubatch=64,
                  n_ctx=512, load_tokenizer=False)
        try:
            outs = []
            for _ in range(3):
                m.reset()
                outs.append(np.array(m.eval(prompt)))
            outs.append(np.array(m.eval(list(range(9, 9 + 64 + 40)))))  # at depth: 64 + a remainder of 40
            for t in (5, 6):
                outs.append(np.array(m.eval([t])))
            lr = m.runner.layer_replay
            return outs, lr.runs, lr.captures, lr.replays
        finally:
            m.close()
    for ngl in (0, 2):
        eager, runs0, _, _ = run(False, ngl)
        static, runs, captures, replays = run(True, ngl)
        assert runs0 == 0 and runs == 4
        assert captures >= 3 * 3 and replays >= 3 * 3  # prompt 2 captured, prompt 3 replayed
        for a, b in zip(static, eager):
            assert _nmse(a, b) < 1e-3, ngl


@pytest.mark.slow
def test_static_layer_major_with_activations_past_fp16(tmp_path):
    """The 8B layer shapes with every block scale 0.02 (the residual stream passes 65504,
    tests/test_large_activations.py), streamed in bf16 through the static layer-major path: the
    CPU's greedy tokens."""
    path = write_model(tmp_path / "large.gguf", "llama3-8b-v4k", "Q4_0", layers=2, seed=3, scale=0.02)
    prompt = list(range(100, 148))  # three ubatches of 16

    def greedy(m):
        out = []
        for _ in range(2):  # the second prompt in static form (the first was seen)
            m.reset()
            logits, out = m.eval(prompt), []
            for _ in range(4):
                out.append(int(np.argmax(logits)))
                logits = m.eval([out[-1]])
        return out
    cpu = Model(load_model(path), device=None, n_ctx=64, n_ubatch=16, load_tokenizer=False)
    try:
        want = greedy(cpu)
    finally:
        cpu.close()
    be = FakeDeviceBackend(Always(), dtype="bf16", n_slots=2)
    be.static_prefill = True
    m = Model(load_model(path), n_gpu_layers=0, device_backend=be, n_ubatch=16, n_ctx=64, load_tokenizer=False,
              device=None)
    try:
        assert greedy(m) == want
        assert m.runner.layer_replay.runs == 2
    finally:
        m.close()
