"""A run that runs out of device memory or is interrupted (issue 7): a clear error, nothing left
running in the background, and the model object still usable. On the fake device, whose copies
really are deferred until someone waits for them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fake_device import FakeDeviceBackend
from lstream.api import Model
from lstream.core.errors import OutOfMemory
from lstream.core.ops import Op
from lstream.core.policy import Always
from lstream.loaders.model_file import load_model
from lstream.tools.synth_model import write_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny", "Q4_0", layers=4, seed=7)


def _fail_once(dev, exc, at_call=9):
    """The device's compute raises `exc` at its at_call-th matmul, once."""
    real, calls = dev.compute, [0]

    def compute(node, inputs, ctx):
        if node.op is Op.MATMUL:
            calls[0] += 1
            if calls[0] == at_call:
                raise exc
        return real(node, inputs, ctx)
    dev.compute = compute


@pytest.mark.parametrize("exc,expect", [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                         OutOfMemory), (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failed_run_leaves_a_usable_model(model_path, exc, expect):
    toks = np.random.default_rng(0).integers(0, 512, 100)
    ref_dev = FakeDeviceBackend(Always())
    ref = Model(load_model(model_path), device_backend=ref_dev, n_ubatch=32, n_ctx=256, load_tokenizer=False)
    want = (ref.eval(toks[:40]), ref.eval(toks[40:]))

    dev = FakeDeviceBackend(Always())
    m = Model(load_model(model_path), device_backend=dev, n_ubatch=32, n_ctx=256, load_tokenizer=False)
    m.eval(toks[:40])
    _fail_once(dev, exc)
    with pytest.raises(expect) as info:
        m.eval(toks[40:])
    if expect is OutOfMemory:
        msg = str(info.value)
        assert "\n" not in msg and "out of device memory" in msg and "lower -ngl, -ub or -c" in msg
    # nothing queued in the background, no layer held, the cache at the last finished run
    for s in (dev.rt.copy_stream, dev.rt.kv_stream, dev.rt.compute_stream):
        assert s.queue == []
    assert not dev.streamer.active and dev._run is None
    assert m.n_past == 40
    again = m.eval(toks[40:])  # the same call again, now without the failure
    np.testing.assert_allclose(again, want[1], rtol=0, atol=1e-4)
