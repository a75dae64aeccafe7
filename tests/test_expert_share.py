"""The device's share of a host-expert decode step (backends/cuda/expert_share.py) on the fake device:
of each token's routed experts the device copies `moe_share` out of the pinned arena (one 2-D copy
each: gate, up and down) and computes them, the CPU the rest; the tokens and logits stay the CPU's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_device import FakeDeviceBackend  # noqa: E402
from lstream.api import Model  # noqa: E402
from lstream.core.policy import BatchThreshold  # noqa: E402
from lstream.loaders.model_file import load_model  # noqa: E402
from lstream.tools import tiny_moe  # noqa: E402

MAX_NMSE = 1e-6  # the CPU's int8 activations against the device's float32 (measured ~1e-9)


@pytest.fixture(scope="module", params=["qwen3moe", "mixtral"])
def tiny(request, tmp_path_factory):
    arch = request.param
    d, ids, ref = tiny_moe.write(arch, tmp_path_factory.mktemp(arch), gguf_types=("Q8_0",), n_layer=3)
    return arch, d, ids, ref


def _model(path, share):
    policy = BatchThreshold()
    dev = FakeDeviceBackend(policy)
    dev.moe_share = share
    m = Model(load_model(path), device_backend=dev, load_tokenizer=False, n_gpu_layers=99, n_ctx=128,
              n_ubatch=16, policy=policy, cpu_moe=True)
    return m, dev


@pytest.mark.parametrize("share", [1, 2])
def test_share_gives_the_cpus_tokens_and_logits(tiny, share):
    """Q8_0 experts (the kernels' types): shared; the float32 safetensors' are not (the CPU computes
    them all), with the same tokens."""
    arch, d, ids, ref = tiny
    for src in (d / f"{arch}-Q8_0.gguf", d / "st"):
        cpu = Model(load_model(src), n_ctx=128, n_ubatch=16, device=None, load_tokenizer=False)
        want = list(cpu.generate_tokens(ids[:12], 6, stop_at_eos=False))
        cpu.reset()
        cpu.eval(ids[:-3])
        want_logits = [cpu.eval([ids[-i]]) for i in range(3, 0, -1)]
        cpu.close()
        m, dev = _model(src, share)
        try:
            assert list(m.generate_tokens(ids[:12], 6, stop_at_eos=False)) == want, src.name
            n_moe = m.runner.replay.host_moe_runs
            assert n_moe > 0 and dev._share.experts_computed == (share * n_moe if src.name != "st" else 0)
            m.reset()
            m.eval(ids[:-3])
            for i, r in zip(range(3, 0, -1), want_logits):
                out = m.eval([ids[-i]])
                assert float(((out - r) ** 2).sum() / (r ** 2).sum()) < MAX_NMSE, (src.name, i)
        finally:
            m.close()


def test_share_copies_one_2d_copy_per_expert(tiny):
    """Each shared expert crosses as one DMA of its three tensors' rows; off (0) the hop copies none."""
    arch, d, ids, _ = tiny
    for share in (0, 2):
        m, dev = _model(d / f"{arch}-Q8_0.gguf", share)
        try:
            m.eval(ids[:8])
            dev.rt.log.clear()
            m.eval([ids[8]])
            n_layers = m.runner.replay.host_moe_runs
            sizes = [e[3] for e in dev.rt.log if e[0] == "copy" and e[1] == "compute"]
            eb = m.residency["blk.0.ffn_gate_exps.weight"].expert_nbytes
            assert sizes.count(3 * eb) == share * n_layers
            assert (dev._share is None) == (share == 0)
        finally:
            m.close()
