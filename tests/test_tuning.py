"""The default policy's decode split, chosen by measurement (core/tuning.py, core/policy.AutoSplit)."""
from __future__ import annotations

import numpy as np
import pytest

from fake_device import FakeDeviceBackend
from lstream.api import Model
from lstream.core.policy import AutoSplit, make_policy
from lstream.core.tuning import tune_split
from lstream.loaders.model_file import load_model
from lstream.tools.synth_model import write_model


@pytest.mark.parametrize("n,cpu,copy,base", [(33, 2.2, 2.4, 1.0), (17, 1.0, 5.0, 0.5), (17, 5.0, 1.0, 0.5),
                                             (8, 1.0, 1.0, 0.0), (1, 3.0, 1.0, 0.2)])
def test_tune_split_finds_the_fastest(n, cpu, copy, base):
    """A step costs max(CPU part, copies) plus a fixed part: the search finds its minimum and
    measures a handful of splits, not all of them."""
    calls = []

    def step(j):
        calls.append(j)
        return base + max(cpu * j, copy * (n - j))
    best, seen = tune_split(n, step)
    assert step(best) == min(step(j) for j in range(n + 1))
    assert len(set(calls[:len(seen)])) == len(seen) <= 7


@pytest.mark.parametrize("n,slots", [(33, 3), (17, 3)])
def test_tune_split_measures_the_ring_cliff(n, slots):
    """Measured on the H200 (2026-12-03, -ngl 0): with <= `slots` streamed layers the ring keeps them
    and a step copies nothing, so the cost drops at n - slots; the walk from the all-CPU end stops at
    n - 1 (slower: 4+ layers through 3 slots copy every step) unless that point is measured too."""
    def step(j):  # ms: CPU layers 1.95 each, copies 2.35 a layer not hidden, a hop each way if any
        streamed = n - j
        return 0.3 + 1.95 * j + (2.0 if streamed else 0.0) + (0.0 if streamed <= slots else 2.35 * streamed)
    best, _ = tune_split(n, step)
    assert best != n - slots  # the walk alone misses it
    best, _ = tune_split(n, step, also=(n - slots,))
    assert best == n - slots == min(range(n + 1), key=step)


class TimedFake(FakeDeviceBackend):
    real_time = True  # let the policy measure (the fake's times are the CPU's: only the logic is tested)


def test_auto_split_measures_and_keeps_the_cache(tmp_path):
    path = write_model(tmp_path / "tiny.gguf", "tiny", "Q4_0", layers=4, seed=2)
    ref = Model(load_model(path), n_ctx=64, load_tokenizer=False)
    toks = np.arange(5, 25)
    want = [ref.eval(toks), ref.eval([3])]
    m = Model(load_model(path), n_gpu_layers=1, device_backend=TimedFake(AutoSplit()), n_ctx=64, load_tokenizer=False)
    try:
        pol = m.policy
        assert pol.measured and 0 <= pol.cpu_layers <= pol.n_host == 4 and m.kv.n_past == 0
        assert "measured" in pol.describe()
        got = [m.eval(toks), m.eval([3])]
        m.set_policy(make_policy("auto"))  # measured again with context cached: the context stays
        assert m.kv.n_past == len(toks) + 1 and m.policy.measured
        for a, b in zip(got, want):
            assert float(((a - b) ** 2).sum() / (b ** 2).sum()) < 1e-4
    finally:
        m.close()
        ref.close()


def test_auto_split_is_measured_again_at_a_new_depth(tmp_path, monkeypatch):
    """A prompt that ends past 1024 cached tokens measures the split there (once per depth bucket);
    back at a shallow depth the first measurement returns without measuring; logits unchanged."""
    import lstream.core.tuning as tuning
    path = write_model(tmp_path / "tiny.gguf", "tiny", "Q4_0", layers=3, seed=4)
    calls = []
    real = tuning.tune_split

    def counted(n_host, step, **kw):
        calls.append(n_host)
        return real(n_host, step, **kw)
    monkeypatch.setattr(tuning, "tune_split", counted)
    toks = np.arange(1100) % 200 + 5
    ref = Model(load_model(path), n_ctx=1200, load_tokenizer=False)
    want = [ref.eval(toks), ref.eval([3])]
    m = Model(load_model(path), n_gpu_layers=1, device_backend=TimedFake(AutoSplit()), n_ctx=1200,
              load_tokenizer=False)
    try:
        assert len(calls) == 1 and set(m._splits) == {0}
        got = [m.eval(toks), m.eval([3])]
        assert len(calls) == 2 and set(m._splits) == {0, 10} and m.kv.n_past == len(toks) + 1
        for a, b in zip(got, want):
            assert float(((a - b) ** 2).sum() / (b ** 2).sum()) < 1e-4
        m.reset()  # an empty cache: the first bucket's split, no measuring
        assert len(calls) == 2 and m.policy.cpu_layers == m._splits[0][0] and m._depth_bucket == 0
        m.eval(toks[:1030])  # a measured bucket again: its split, no measuring
        assert len(calls) == 2 and m.policy.cpu_layers == m._splits[10][0]
        m.eval(toks[:20])  # 1050 cached: still that bucket
        assert len(calls) == 2 and m._depth_bucket == 10
    finally:
        m.close()
        ref.close()


def test_auto_measures_how_many_experts_a_decode_step_uploads(tmp_path):
    """Experts in host memory (--cpu-moe): the default policy times decode steps uploading 0..top_k
    of each layer's routed experts (the CPU computes the rest) and keeps the fastest; the outputs
    stay those of the CPU alone."""
    path = write_model(tmp_path / "moe.gguf", "tiny-moe", "Q8_0", seed=3)
    ref = Model(load_model(path), n_ctx=64, load_tokenizer=False)
    toks = np.arange(5, 12)
    want = ref.eval(toks)
    m = Model(load_model(path), n_gpu_layers=99, cpu_moe=True, device_backend=TimedFake(AutoSplit()), n_ctx=64,
              load_tokenizer=False)
    try:
        pol, top_k = m.policy, m.config.n_expert_used
        assert pol.n_host == 0 and pol.experts_measured and set(pol.experts_measured) <= set(range(top_k + 1))
        assert {0, top_k} <= set(pol.experts_measured) and 0 <= pol.decode_experts <= top_k
        assert "routed experts uploaded per step" in pol.describe() and m.kv.n_past == 0
        got = m.eval(toks)
        assert float(((got - want) ** 2).sum() / (want ** 2).sum()) < 1e-4
    finally:
        m.close()
        ref.close()


def test_a_lucky_step_does_not_choose():
    """Split 0 measures 70 once but typically 110; split 30 steadily 60 and the all-CPU end 84: the
    two fastest are measured again in turn and compared by their medians."""
    typical = {0: 110.0}
    first = {0: 50.0}
    calls = []

    def step(j):
        calls.append(j)
        if j in first and calls.count(j) == 1:
            return first[j]
        return typical.get(j, 60.0 if j == 30 else 84.0 + abs(30 - j))
    best, seen = tune_split(33, step, also=(30,))
    assert best == 30 and seen[0] == 110.0
