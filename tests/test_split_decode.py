"""Decode split between the CPU and the copy engine (issue 5): LayerSplit and the CostModel's
choice of split, run on the fake device (tests/fake_device.py) so it is tested without a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from fake_device import FakeDeviceBackend
from lstream.api import Model
from lstream.core.ops import Op
from lstream.core.policy import Calibration, CostModel, LayerSplit, make_policy
from lstream.loaders.model_file import load_model
from lstream.tools.synth_model import write_model

N_LAYER = 6


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny", "Q4_0", layers=N_LAYER, seed=5)


def _model(path, ngl, policy):
    dev = FakeDeviceBackend(policy)
    return Model(load_model(path), n_gpu_layers=ngl, device_backend=dev, n_ubatch=64, n_ctx=256,
                 load_tokenizer=False), dev


def _nmse(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.fixture(scope="module")
def reference(model_path):
    m = Model(load_model(model_path), n_ctx=256, load_tokenizer=False)
    toks = np.random.default_rng(1).integers(0, 512, 40)
    out = [m.eval(toks)] + [m.eval([t]) for t in (5, 9, 11)]
    return toks, out


@pytest.mark.parametrize("ngl,k", [(0, 2), (3, 1), (0, 0)])
def test_layer_split_decode(model_path, reference, ngl, k):
    toks, ref = reference
    m, dev = _model(model_path, ngl, LayerSplit(k))
    out = [m.eval(toks)] + [m.eval([t]) for t in (5, 9, 11)]
    for a, b in zip(out, ref):
        assert _nmse(a, b) < 1e-4
    first_host = 0
    n_host = N_LAYER - ngl
    plan = m.plan(1)
    where = {a.node.name: a.backend for a in plan.assignments()}
    for layer in range(N_LAYER):
        q = where[f"blk.{layer}.q"]
        expect = "cpu" if first_host <= layer < first_host + k else "fake"
        assert q == expect, (layer, q)
        if layer < n_host:  # host K/V: attention stays on the CPU
            assert where[f"blk.{layer}.attn"] == "cpu"
    if 0 < ngl <= N_LAYER:  # resident layers between streamed ones and the streamed head: a static segment
        assert m.runner.replay.segment_runs == 3
    # more streamed layers than ring slots: every one crosses again in every decode step (the ring
    # keeps its few slots; grown to hold them all across steps, it would use VRAM beyond what -ngl
    # leaves for weights, as a model that fits)
    streamed = n_host - k + (1 if ngl <= N_LAYER else 0)  # + the output head (host below -ngl N+1)
    assert len(dev.streamer.slots) == dev.ring_slots
    if streamed > dev.ring_slots:
        ups = {w for a in plan.assignments() if a.backend == dev.name and a.node.op is not Op.EMBED
               for w in a.uploads if len(m.residency[w].shape) == 2}  # (norms travel apart, once)
        n0 = len(dev.rt.log)
        m.eval([13])
        assert sum(x[3] for x in dev.rt.log[n0:] if x[0] == "copy" and x[1] == "copy") == \
            sum(m.residency[w].nbytes for w in ups)


def test_cost_model_balances_cpu_and_copy(model_path):
    m, dev = _model(model_path, 0, LayerSplit(0))
    # CPU 1 s per layer vs copy 0.5 s per layer: the CPU takes about a third of the layers
    e = next(e for e in m.residency if e.name == "blk.0.attn_q.weight")
    per_layer_w = sum(x.n_rows * x.n_cols for x in m.residency if x.layer == 0 and len(x.shape) > 1)
    per_layer_b = sum(x.nbytes for x in m.residency if x.layer == 0 and len(x.shape) > 1)
    cal = Calibration(h2d_bytes_per_s=per_layer_b / 0.5, gpu_flops=1e15,
                      cpu_weights_per_s={e.qtype.name: per_layer_w / 1.0}, cpu_flops=1e12)
    cm = CostModel(cal)
    m.set_policy(cm)
    cpu_s, copy_s, all_cpu = cm.predicted
    assert 2 <= cm.split.cpu_layers <= 3 and max(cpu_s, copy_s) < all_cpu
    assert "split cpu" in cm.describe()
    plan = m.plan(1)
    assert any(a.backend == "fake" for a in plan.assignments()) and any(a.backend == "cpu" for a in plan.assignments())


def test_make_policy_split():
    assert make_policy("split:4").cpu_layers == 4
    with pytest.raises(ValueError, match="split:N"):
        make_policy("split")


def test_decode_units_fuse_the_ffn_activation(model_path):
    """A resident decode split's units: each layer's gate and up GEMVs and SwiGLU as one unit (one
    launch with the activation in its epilogue on a GPU; node by node elsewhere, as here)."""
    from lstream.backends.cuda.fused import GateUpAct
    from lstream.core.executor import RunContext
    from lstream.core.ops import Op
    m, dev = _model(model_path, N_LAYER + 1, LayerSplit(0))
    try:
        split = next(s for s in m.plan(1).splits if s.backend == dev.name)
        ctx = RunContext(tokens=np.zeros(1, np.int32), positions=np.zeros(1, np.int64), n_past=0, kv=m.kv,
                         residency=m.residency)
        units = dev.compile_split(split.assignments, m.executor.last_use, ctx)
        glu = [u for u in units if isinstance(u, GateUpAct)]
        assert len(glu) == N_LAYER
        assert all([n.op for n in u.nodes] == [Op.MATMUL, Op.MATMUL, Op.SWIGLU] for u in glu)
        assert all(u.nodes[0].name.endswith("gate") and u.outputs == [u.nodes[2].id] for u in glu)
    finally:
        m.close()
