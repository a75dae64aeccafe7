"""Streaming and the device backend's logic, in CI without a GPU: tests/fake_device.py runs
backends/cuda.py's code on CPU tensors with simulated streams whose copies run late (only when
someone waits for them), so a missing wait reads poisoned slot bytes and the numbers go wrong."""
from __future__ import annotations

import numpy as np
import pytest

from fake_device import FakeDeviceBackend
from lstream.api import Model
from lstream.core.errors import NonFiniteError
from lstream.core.policy import Always, BatchThreshold, Never
from lstream.loaders.model_file import load_model
from lstream.tools.synth_model import write_model

N_LAYER = 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny", "Q4_0", layers=N_LAYER, seed=3)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 512, 80)


def _model(path, ngl, dev, ub=32, **kw):
    return Model(load_model(path), n_gpu_layers=ngl, device_backend=dev, n_ubatch=ub, n_ctx=256, load_tokenizer=False,
                 **kw)


def _nmse(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.fixture(scope="module")
def cpu_ref(model_path, tokens):
    m = _model(model_path, 0, None)
    prefill = m.eval(tokens)
    step = m.eval([7])
    kv = [(layer.k[:len(tokens) + 1].copy(), layer.v[:len(tokens) + 1].copy()) for layer in m.kv.layers]
    return prefill, step, kv


@pytest.mark.parametrize("ngl,policy", [(999, BatchThreshold(32)), (2, BatchThreshold(32)), (0, Always()),
                                        (0, BatchThreshold(32)), (0, Never())],
                         ids=["ngl999", "ngl2-threshold", "ngl0-always", "ngl0-threshold", "ngl0-never"])
def test_matches_cpu(model_path, tokens, cpu_ref, ngl, policy):
    dev = FakeDeviceBackend(policy)
    m = _model(model_path, ngl, dev)
    prefill, step = m.eval(tokens), m.eval([7])
    assert _nmse(prefill, cpu_ref[0]) < 1e-4
    assert _nmse(step, cpu_ref[1]) < 1e-4
    streamed = dev.streamer.stats.bytes_streamed if dev.streamer else 0
    if isinstance(policy, Never) or ngl == 999:
        assert streamed == 0
    else:
        assert streamed > 0


def test_ring_order_and_reuse(model_path, tokens):
    """Each acquire reads the fill it waited for; a slot is refilled only after its reader released."""
    dev = FakeDeviceBackend(Always(), n_slots=2, speculate=False)
    m = _model(model_path, 0, dev)
    m.eval(tokens)
    log = dev.streamer.log
    fills = [e for e in log if e[0] == "fill"]
    assert len(fills) > 2 * len(dev.streamer.slots)  # the ring was reused
    current: dict[int, tuple[int, int]] = {}  # slot -> (layer, gen) last filled
    released: dict[int, bool] = {}
    for what, layer, slot, gen in log:
        if what == "fill":
            assert released.get(slot, True), f"slot {slot} refilled before layer {current[slot][0]} was released"
            current[slot], released[slot] = (layer, gen), False
        elif what == "acquire":
            assert current[slot] == (layer, gen)
        elif what == "release":
            assert current[slot] == (layer, gen)
            released[slot] = True
    # layers stream in compute order, 0..n-1 per ubatch; the output head only with the last
    # ubatch, the only one whose logits are read
    layers = [e[1] for e in fills]
    assert layers[:N_LAYER] == list(range(N_LAYER))
    assert layers.count(N_LAYER) == 1 and layers[-1] == N_LAYER
    # the copy stream waited on the slot's compute-done event before each refill
    waits = [e for e in dev.rt.log if e[0] == "wait" and e[1] == "copy" and e[3]]
    assert len(waits) >= len(fills) - len(dev.streamer.slots)


def test_missing_wait_reads_stale_bytes(model_path, tokens, cpu_ref, monkeypatch):
    """The fake really defers copies: skip the compute stream's waits and the result breaks."""
    dev = FakeDeviceBackend(Always())
    m = _model(model_path, 0, dev)
    monkeypatch.setattr(dev.rt.compute_stream, "wait_event", lambda ev: None)
    try:
        out = m.eval(tokens)
    except NonFiniteError:  # the poisoned slot bytes (0xFF: NaN scales) were read and reported
        return
    assert _nmse(out, cpu_ref[0]) > 1e-2


def test_kv_write_back_then_cpu_decode(model_path, tokens, cpu_ref):
    """Prefill computes host layers on the device; their K/V go back to host memory, and decode on
    the CPU (threshold policy: 1 token stays on the CPU) reads them."""
    dev = FakeDeviceBackend(BatchThreshold(32))
    m = _model(model_path, 0, dev)
    m.eval(tokens)
    assert dev.streamer.stats.bytes_streamed > 0
    plan1 = m.plan(1)
    assert all(a.backend == "cpu" for a in plan1.assignments())
    step = m.eval([7])
    assert _nmse(step, cpu_ref[1]) < 1e-4
    t = len(tokens) + 1
    for layer, (k, v) in zip(m.kv.layers, cpu_ref[2]):
        # the CPU quantizes activations to int8 in its matmuls: compare by normalized MSE
        assert _nmse(layer.k[:t], k) < 1e-4 and _nmse(layer.v[:t], v) < 1e-4
        assert np.abs(layer.k[:len(tokens)]).min(axis=(1, 2)).max() >= 0 and np.abs(layer.k[:t]).sum(axis=(1, 2)).all()


def test_vram_flat_across_runs(model_path, tokens):
    dev = FakeDeviceBackend(Always(), n_slots=3)
    m = _model(model_path, 0, dev)
    m.eval(tokens)
    first = dev.rt.device_bytes
    for _ in range(3):
        m.reset()
        m.eval(tokens)
    assert dev.rt.device_bytes == first
    assert dev.streamer.device_bytes() == 3 * dev.streamer.slot_bytes
    assert len(dev._kv_pending) == 0


def test_pinning_fallback_warns(model_path, tokens):
    dev = FakeDeviceBackend(Always(), pin_ok=False)
    m = _model(model_path, 0, dev)
    with pytest.warns(RuntimeWarning, match="pin"):
        m.eval(tokens)


def test_policy_decisions(model_path):
    dev = FakeDeviceBackend(BatchThreshold(32))
    m = _model(model_path, 0, dev)
    small, big = m.plan(8), m.plan(64)
    assert all(a.backend == "cpu" for a in small.assignments())
    on_dev = [a for a in big.assignments() if a.backend == "fake"]
    assert {a.node.op.value for a in on_dev} >= {"matmul", "attention", "rms_norm", "add", "embed"}
    assert big.upload_bytes > 0 and small.upload_bytes == 0
    assert len(big.splits) == 1  # the embedding's token rows are gathered on the host and uploaded


def test_speculative_prefetch_between_ubatches(model_path, tokens, cpu_ref):
    dev = FakeDeviceBackend(Always(), n_slots=3, speculate=True)
    m = _model(model_path, 0, dev, ub=16, layer_major=False)  # layer-major streams each layer once
    out = m.eval(tokens)
    assert _nmse(out, cpu_ref[0]) < 1e-4
    kinds = [e[0] for e in dev.streamer.log]
    assert "speculate" in kinds and "reuse" in kinds


def test_stream_stats_for_the_cli(model_path, tokens):
    from lstream.cli.bench import stream_fields
    dev = FakeDeviceBackend(Always())
    m = _model(model_path, 0, dev)
    assert dev.stream_stats() == {}
    m.eval(tokens)
    f = stream_fields(m)
    assert f["bytes_streamed"] > 0 and 0.0 <= f["copy_hidden"] <= 1.0


def test_speculation_follows_the_engine_hint(model_path, tokens):
    from types import SimpleNamespace
    dev = FakeDeviceBackend(Always(), speculate=False)
    assert dev._speculate_now(SimpleNamespace()) is False
    assert dev._speculate_now(SimpleNamespace(more_ubatches=True)) is False  # not allowed
    assert FakeDeviceBackend(Always(), speculate=True)._speculate_now(SimpleNamespace(more_ubatches=True)) is True
    assert FakeDeviceBackend(Always(), speculate=True)._speculate_now(SimpleNamespace(more_ubatches=False)) is False


@pytest.mark.parametrize("ngl", [0, 2])
def test_layer_major_ubatches_stream_each_layer_once(model_path, tokens, cpu_ref, ngl):
    """A prompt of several ubatches runs layer by layer: every streamed layer crosses once per
    prompt (ubatch by ubatch it crosses once per ubatch), with the same logits, K/V and decode."""
    n_ub = -(-len(tokens) // 16)
    outs, fills = {}, {}
    for layer_major in (True, False):
        dev = FakeDeviceBackend(Always(), n_slots=2, speculate=False)
        m = _model(model_path, ngl, dev, ub=16, layer_major=layer_major)
        outs[layer_major] = (m.eval(tokens), m.eval([7]))
        fills[layer_major] = [e[1] for e in dev.streamer.log if e[0] == "fill"]
        assert _nmse(outs[layer_major][0], cpu_ref[0]) < 1e-4 and _nmse(outs[layer_major][1], cpu_ref[1]) < 1e-4
    streamed = sorted(set(fills[True]))
    # prompt: each layer once, in order (the head with it); decode (1 token, Always): once more
    assert fills[True] == streamed + streamed
    # ubatch by ubatch, a ring smaller than the streamed layers refills every layer per ubatch
    if len(streamed) - 1 > 2:
        assert len(fills[False]) >= (n_ub - 1) * (len(streamed) - 1) + 2 * len(streamed)
    np.testing.assert_allclose(outs[True][0], outs[False][0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(outs[True][1], outs[False][1], rtol=0, atol=1e-5)
