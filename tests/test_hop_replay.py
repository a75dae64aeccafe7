"""A host-expert decode step as one graph, its hops served through a mailbox (core/hop_replay.py,
core/hop_mailbox.py, backends/cuda/mailbox.py). On the fake device a "graph" is the captured walk,
replayed on a thread: the device runs while the host answers its hops, as on a GPU, with the same
flag words and pinned buffers (tests/fake_device.py's stream memory operations). The tokens and
logits are those of the segment path and of the CPU."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from fake_device import FakeDeviceBackend  # noqa: E402
from lstream.api import Model  # noqa: E402
from lstream.core.hop_mailbox import HopTimeout, HostMailbox  # noqa: E402
from lstream.core.ops import Op  # noqa: E402
from lstream.core.policy import BatchThreshold  # noqa: E402
from lstream.loaders.model_file import load_model  # noqa: E402
from lstream.tools import tiny_moe  # noqa: E402

MAX_NMSE = 1e-10  # the same float32 ops on the same values in another order of launches (measured 0)


class FakeGraph:
    def __init__(self, fn):
        self.fn, self.thread, self.value, self.error = fn, None, None, None

    def start(self):
        def body():
            try:
                self.value = self.fn()
            except BaseException as e:  # (re-raised by join, on the caller's thread)
                self.error = e
        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self):
        if self.thread is not None:
            self.thread.join(120)
            assert not self.thread.is_alive(), "the replayed step never finished"
            self.thread = None
        if self.error is not None:
            e, self.error = self.error, None
            raise e


class ThreadGraphBackend(FakeDeviceBackend):
    """Graphs on the fake device: a capture keeps the function, a replay runs it on a thread. What a
    real graph reads from its static inputs the function reads from the run context it was captured
    with, so a replay first gives that context the latest filled step's values."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.graphs = True
        self._running: list[FakeGraph] = []
        self._filled: dict[int, object] = {}  # id(step inputs) -> the context they were last filled from

    def fill_step_inputs(self, si, ctx):
        super().fill_step_inputs(si, ctx)
        self._filled[id(si)] = ctx

    def capture(self, fn, inputs, whole=False, warm=True):
        if warm:
            fn()
        g = FakeGraph(fn)
        g.si, g.ctx = inputs, self._filled[id(inputs)]
        return g, g

    def replay(self, graph):
        self.synchronize()
        now = self._filled[id(graph.si)]
        if now is not graph.ctx:
            graph.ctx.__dict__.update(now.__dict__)
        graph.ctx.graph = graph.si
        graph.si.cache.clear()  # (per-step values a real graph recomputes from the static inputs)
        graph.start()
        self._running.append(graph)

    def synchronize(self):
        while self._running:
            self._running.pop().join()
        super().synchronize()

    def to_host(self, value):
        if isinstance(value, FakeGraph):
            self.synchronize()
            value = value.value
        return super().to_host(value)


@pytest.fixture(scope="module", params=tiny_moe.ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    d, ids, _ = tiny_moe.write(arch, tmp_path_factory.mktemp(arch), gguf_types=("Q8_0",), n_layer=3)
    return d / f"{arch}-Q8_0.gguf", ids


def _model(path, backend=ThreadGraphBackend, **kw):
    policy = BatchThreshold()
    dev = backend(policy)
    m = Model(load_model(path), device_backend=dev, load_tokenizer=False, n_gpu_layers=99, n_ctx=128,
              n_ubatch=16, policy=policy, **kw)
    return m, dev


def n_moe(m) -> int:
    return sum(a.node.op is Op.MOE for a in m.plan(1).assignments())


def _decode(m, ids, n=6):
    """Greedy tokens and each step's logits."""
    m.reset()
    out = m.eval(ids)
    toks, logits = [], []
    for _ in range(n):
        toks.append(int(np.argmax(out)))
        logits.append(out)
        out = m.eval([toks[-1]])
    return toks, logits


@pytest.mark.parametrize("kw", [{"cpu_moe": True}, {"n_cpu_moe": 1}])
def test_hops_in_one_graph_give_the_segment_paths_tokens(tiny, kw):
    path, ids = tiny
    cpu = Model(load_model(path), n_ctx=128, n_ubatch=16, device=None, load_tokenizer=False)
    want_toks, _ = _decode(cpu, ids[:12])
    cpu.close()
    seg, _ = _model(path, FakeDeviceBackend, **kw)  # no graphs: the segment path, hops read back
    seg_toks, seg_logits = _decode(seg, ids[:12])
    seg.close()
    m, dev = _model(path, **kw)
    try:
        toks, logits = _decode(m, ids[:12])
        assert toks == seg_toks == want_toks
        for a, b in zip(logits, seg_logits):
            assert float(((a - b) ** 2).sum() / (b ** 2).sum()) < MAX_NMSE
        r = m.runner.replay
        n_hops = sum(a.node.op is Op.MOE and a.backend == "cpu" for a in m.plan(1).assignments())
        assert n_hops == (n_moe(m) if kw.get("cpu_moe") else 1)
        # the first step warms up and captures; every step replays the one graph and serves its hops
        assert r.hops.runs == 6 and r.captures == 1 and r.segment_runs == 0
        assert r.hops.served == 6 * n_hops
        waits = [e for e in dev.rt.log if e[0] == "wait value"]
        assert len(waits) == 6 * n_hops  # one stream wait per hop per replay, none in the warm-up
    finally:
        m.close()


@pytest.mark.parametrize("share", [1, 2])
def test_hops_with_the_device_share(tiny, share, monkeypatch):
    """--moe-share N with the hops in one graph: the host copies each hop's last N experts on its copy
    stream and raises the shared flag; the graph computes them while the CPU computes the rest."""
    monkeypatch.setenv("LSTREAM_SHARE_GRAPHS", "0")  # (the warm-up's segment-path share: no fake graph of its own)
    path, ids = tiny
    seg, _ = _model(path, FakeDeviceBackend, cpu_moe=True)
    want, ref = _decode(seg, ids[:12])
    seg.close()
    m, dev = _model(path, cpu_moe=True)
    dev.moe_share = share
    try:
        toks, logits = _decode(m, ids[:12])
        r = m.runner.replay
        hop = next(v for v in r.hops._steps.values())[4]
        n_shared = sum(lay is not None for lay in hop.layers)
        if "qwen2moe" in str(path):  # (a shared expert: its MoE op is the host's alone)
            assert n_shared == 0
        else:
            assert n_shared == n_moe(m) and hop.experts_computed == 6 * n_shared * share
        assert r.hops.runs == 6 and r.segment_runs == 0
        assert toks == want
        for a, b in zip(logits, ref):
            assert float(((a - b) ** 2).sum() / (b ** 2).sum()) < 1e-6  # the CPU's int8 activations vs float32
    finally:
        m.close()


def test_a_failing_hop_releases_the_graph(tiny):
    """An error on the host mid-step: the graph's later waits are released (no hang), the error is
    the caller's, and the next step runs."""
    path, ids = tiny
    m, dev = _model(path, cpu_moe=True)
    try:
        m.eval(ids[:12])
        m.eval([ids[12]])  # captured
        host = m.runner.executor.backends["cpu"]
        # (hops the device routed reach the host's moe_experts; Qwen2-MoE's, with its shared expert, moe_hop)
        attr = "moe_hop" if "qwen2moe" in str(path) else "moe_experts"
        real = getattr(host, attr)
        calls = []

        def failing(node, *a):
            calls.append(node.layer)
            if len(calls) == 2:
                raise ValueError("expert failure for the test")
            return real(node, *a)
        setattr(host, attr, failing)
        with pytest.raises(ValueError, match="expert failure"):
            m.eval([ids[13]])
        assert not dev._running  # the replayed step ran to its end
        setattr(host, attr, real)
        assert np.isfinite(m.eval([ids[13]])).all()
    finally:
        m.close()


def _device(box, values, answers, n):
    """The device's side of n hops on a thread: post values[j], wait for the answer, keep it."""
    for j in range(n):
        flat, _ = box.down[j]
        flat[:] = values[j]
        box.flags[j] = 1
        while box.flags[n + j] == 0:
            pass
        answers.append(box.up[j].copy())


def test_mailbox_protocol_in_order():
    n = 4
    box = HostMailbox(np.zeros(3 * n, np.int32))
    for j in range(n):
        box.down[j] = (np.zeros(6, np.float32), [(1, 4), (1, 2)])
        box.up[j] = np.zeros((1, 4), np.float32)
    values = [np.arange(6, dtype=np.float32) + 10 * j for j in range(n)]
    answers: list = []
    box.reset()
    t = threading.Thread(target=_device, args=(box, values, answers, n))
    t.start()
    for j in range(n):
        x, logits = box.wait_posted(j, timeout=30)
        assert x.shape == (1, 4) and logits.shape == (1, 2)
        np.testing.assert_array_equal(logits[0], values[j][4:])
        box.answer(j, 2 * x)
    t.join(30)
    assert not t.is_alive()
    for j in range(n):
        np.testing.assert_array_equal(answers[j][0], 2 * values[j][:4])


def test_mailbox_release_and_timeout():
    box = HostMailbox(np.zeros(6, np.int32))
    with pytest.raises(HopTimeout, match="hop 1: the device posted nothing"):
        box.wait_posted(1, timeout=0.05)
    box.release()
    assert list(box.flags) == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="3 per hop"):
        HostMailbox(np.zeros(4, np.int32))
