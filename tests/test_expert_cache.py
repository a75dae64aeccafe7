"""--expert-cache (core/expert_cache.py): decode with every layer's experts in host memory keeps the
recently routed ones in a VRAM cache (least recently used evicted), computes its hits on the device
and leaves the misses to the CPU while they are copied in. On the fake device (CPU tensors, copies
that run late unless waited for): the same greedy tokens as the CPU alone, hits once the routing
repeats, a small cache evicting, its hit rate in the profile table."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fake_device import FakeDeviceBackend  # noqa: E402
from lstream.api import Model  # noqa: E402
from lstream.core import profile as prof_mod  # noqa: E402
from lstream.core.ops import Op  # noqa: E402
from lstream.core.options import Options  # noqa: E402
from lstream.core.policy import BatchThreshold  # noqa: E402
from lstream.loaders.model_file import load_model  # noqa: E402
from lstream.tools import tiny_moe  # noqa: E402


@pytest.fixture(scope="module", params=["mixtral", "qwen3moe"])
def tiny(request, tmp_path_factory):
    arch = request.param
    d, ids, _ = tiny_moe.write(arch, tmp_path_factory.mktemp(arch), gguf_types=("Q8_0",), n_layer=3)
    return d / f"{arch}-Q8_0.gguf", ids


def _greedy(m, prompt, n=10):
    m.reset()
    return list(m.generate_tokens(prompt, n, stop_at_eos=False))


def _expert_bytes(path) -> int:
    """One expert's gate + up + down bytes in this file."""
    res = load_model(path).residency
    e = next(x for x in res if "ffn_gate_exps" in x.name)
    return sum(x.expert_nbytes for x in res if x.layer == e.layer and x.n_expert)


def _model(path, gib: float):
    dev = FakeDeviceBackend(BatchThreshold(), expert_cache_gib=gib)
    m = Model(load_model(path), device_backend=dev, n_gpu_layers=99, cpu_moe=True, n_ctx=128, n_ubatch=16,
              load_tokenizer=False)
    return m, dev


@pytest.mark.parametrize("n_slots", [1000, 3])
def test_cached_decode_gives_the_cpu_tokens(tiny, n_slots):
    path, ids = tiny
    cpu = Model(load_model(path), n_ctx=128, n_ubatch=16, device=None, load_tokenizer=False)
    want = _greedy(cpu, ids[:6])
    cpu.close()
    gib = n_slots * _expert_bytes(path) / 2**30
    m, dev = _model(path, gib)
    try:
        plan = m.plan(1)
        moe = [a for a in plan.assignments() if a.node.op is Op.MOE]
        assert moe and all(a.backend == "fake" and "--expert-cache" in a.cause for a in moe)
        assert _greedy(m, ids[:6]) == want
        c = dev.expert_cache
        assert c.n_slots == min(n_slots, 1000) and c.inserts > 0
        assert len(c.slot_of) <= c.n_slots
        if n_slots == 3:  # more routed experts than slots: the least recently used made room
            assert c.inserts > c.n_slots
        else:  # every routed expert stays: the decode steps after the first find theirs here
            assert c.hits > 0
            assert _greedy(m, ids[:6]) == want  # the same prompt again: the cache is warm
            assert c.hits >= c.lookups // 3
    finally:
        m.close()


def test_profile_reports_the_hit_rate(tiny):
    path, ids = tiny
    m, dev = _model(path, 1000 * _expert_bytes(path) / 2**30)
    try:
        _greedy(m, ids[:6])
        prof = prof_mod.start(m)
        _greedy(m, ids[:6])
        m.profile = None
        text = prof_mod.table(prof, m.config.n_layer)
        assert "expert cache:" in text and "% hits" in text
        assert prof.counts["expert cache hits"] > 0
    finally:
        m.close()


def test_too_small_a_cache_is_a_clear_error(tiny):
    path, ids = tiny
    m, _ = _model(path, 0.5 * _expert_bytes(path) / 2**30)
    try:
        with pytest.raises(ValueError, match="holds no expert"):
            _greedy(m, ids[:6])
    finally:
        m.close()
    with pytest.raises(ValueError, match="expert_cache_gib must be 0 or more"):
        Options(expert_cache_gib=-1)
