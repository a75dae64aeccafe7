"""Every architecture through the device backend's code (on the fake device, CPU tensors): the
ops Qwen3 and Gemma 3 add run there too, resident or streamed, and agree with transformers."""
from __future__ import annotations

import numpy as np
import pytest

from fake_device import FakeDeviceBackend
from lstream.api import Model
from lstream.core.ops import Op
from lstream.core.policy import Always
from lstream.loaders.model_file import load_model

# Fixtures that write tiny random transformers checkpoints and their reference logits.
from test_arch_qwen import tiny as qwen_tiny  # noqa: F401
from test_gemma3 import tiny as gemma_tiny  # noqa: F401

MAX_NMSE = 1e-8  # float32 on both sides (measured ~1e-12 on the CPU backend)


def _check(path, ids, ref, ngl):
    dev = FakeDeviceBackend(Always())
    m = Model(load_model(path), n_gpu_layers=ngl, device_backend=dev, n_ctx=128, n_ubatch=16, load_tokenizer=False)
    try:
        ours = m.eval(ids, logits="all")
        on_device = {a.node.op for a in m.plan(16).assignments() if a.backend == dev.name}
    finally:
        m.close()
    nmse = float(((ours - ref) ** 2).sum() / (ref ** 2).sum())
    assert nmse < MAX_NMSE, nmse
    return on_device


@pytest.mark.parametrize("ngl", [0, 99])
def test_qwen_on_device(qwen_tiny, ngl):
    arch, d, ids, ref = qwen_tiny
    ops = _check(d / "st", ids, ref, ngl)
    assert Op.MATMUL in ops and Op.ATTENTION in ops
    if arch == "qwen3":
        assert Op.RMS_NORM_HEADS in ops


@pytest.mark.parametrize("ngl", [0, 99])
def test_gemma3_on_device(gemma_tiny, ngl):
    variant, d, ids, ref = gemma_tiny
    ops = _check(d / "st", ids, ref, ngl)
    assert {Op.RMS_NORM_HEADS, Op.GEGLU, Op.ATTENTION} <= ops


def _check_decode(path, ids, ref, n_steps=4):
    """Resident decode steps take the static path (core/replay.py: device-side positions,
    split-K decode attention up to each position; graph capture itself needs a GPU) and agree with transformers token by token."""
    dev = FakeDeviceBackend(Always())
    m = Model(load_model(path), n_gpu_layers=99, device_backend=dev, n_ctx=128, n_ubatch=16, load_tokenizer=False)
    try:
        m.eval(ids[:-n_steps])
        for i in range(n_steps, 0, -1):
            out = m.eval([ids[-i]])
            r = ref[-i]
            assert float(((out - r) ** 2).sum() / (r ** 2).sum()) < MAX_NMSE
        assert m.runner.replay.replays == 0 and m.runner.replay.captures == 0  # eager static steps on the fake
        assert m.runner.replay.eligible(m.plan(1), _ctx(m))
    finally:
        m.close()


def _ctx(m):
    from lstream.core.executor import RunContext
    return RunContext(np.zeros(1, np.int32), np.zeros(1), 0, m.kv, m.residency)


def test_static_decode_steps(qwen_tiny, gemma_tiny):
    for _, d, ids, ref in (qwen_tiny, gemma_tiny):
        _check_decode(d / "st", ids, ref)
