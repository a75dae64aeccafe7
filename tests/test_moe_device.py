"""Mixtures of experts through the device backend's code on the fake device (CPU tensors): experts
resident, or in host memory (--cpu-moe, --n-cpu-moe, -ot exps=cpu) with the attention, router and
shared weights resident: decode computes the experts on the CPU (one hop each way per MoE layer),
prefill uploads, expert by expert, those the policy wants (tokens routed to each), layer-major so
each crosses once per prompt. Logits against transformers, greedy tokens against the CPU."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fake_device import FakeDeviceBackend  # noqa: E402
from lstream.api import Model  # noqa: E402
from lstream.cli.plan_view import print_plan  # noqa: E402
from lstream.core.ops import Op  # noqa: E402
from lstream.core.policy import Always, BatchThreshold  # noqa: E402
from lstream.loaders.model_file import load_model  # noqa: E402
from lstream.tools import tiny_moe  # noqa: E402

MAX_NMSE = 1e-8  # float32 on both sides (measured ~1e-13)


@pytest.fixture(scope="module", params=tiny_moe.ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    d, ids, ref = tiny_moe.write(arch, tmp_path_factory.mktemp(arch), gguf_types=("Q8_0",))
    return arch, d, ids, ref


@pytest.fixture(scope="module")
def mixtral3(tmp_path_factory):
    """Three MoE layers: more than the device's two expert slots."""
    d, ids, ref = tiny_moe.write("mixtral", tmp_path_factory.mktemp("mixtral3"), gguf_types=("Q8_0",), n_layer=3)
    return d, ids, ref


def _model(path, policy=None, **kw):
    policy = policy or BatchThreshold()
    dev = FakeDeviceBackend(policy)
    kw = {"n_gpu_layers": 99, "n_ctx": 128, "n_ubatch": 16, "policy": policy, **kw}
    return Model(load_model(path), device_backend=dev, load_tokenizer=False, **kw), dev


def _moe_backends(m, n):
    return [a.backend for a in m.plan(n).assignments() if a.node.op is Op.MOE]


@pytest.mark.parametrize("where", ["resident", "cpu-moe", "ot-exps"])
def test_logits_match_transformers(tiny, where):
    arch, d, ids, ref = tiny
    kw = {"cpu_moe": True} if where == "cpu-moe" else {"overrides": [("exps", "cpu")]} if where == "ot-exps" else {}
    m, dev = _model(d / "st", **kw)
    try:
        assert set(_moe_backends(m, 1)) == {"fake" if where == "resident" else "cpu"}
        assert set(_moe_backends(m, 16)) == {"fake"}  # prefill: the device takes the op (experts per policy)
        assert {a.backend for a in m.plan(1).assignments() if a.node.op is Op.ATTENTION} == {"fake"}
        ours = m.eval(ids, logits="all")
        nmse = float(((ours - ref) ** 2).sum() / (ref ** 2).sum())
        assert nmse < MAX_NMSE, nmse
        m.reset()
        m.eval(ids[:-3])
        for i in range(3, 0, -1):
            out, r = m.eval([ids[-i]]), ref[-i]
            assert float(((out - r) ** 2).sum() / (r ** 2).sum()) < MAX_NMSE
        if where != "resident":
            assert dev.expert_streamer is not None and dev.expert_streamer.uploads > 0
    finally:
        m.close()


def _greedy(m, prompt, n=8):
    m.reset()
    return list(m.generate_tokens(prompt, n, stop_at_eos=False))


def test_greedy_tokens_equal_cpu(tiny):
    """Q8_0 file: CPU only, experts resident, every layer's experts on the host, the first layer's."""
    arch, d, ids, _ = tiny
    path = d / f"{arch}-Q8_0.gguf"
    cpu = Model(load_model(path), n_ctx=128, n_ubatch=16, device=None, load_tokenizer=False)
    want = _greedy(cpu, ids[:24])
    cpu.close()
    for kw in ({}, {"cpu_moe": True}, {"n_cpu_moe": 1}):
        m, dev = _model(path, **kw)
        try:
            # resident: every MoE layer's gate|up stacked for moe_kernels (their torch fallback on CPU tensors)
            n_moe = sum(a.node.op is Op.MOE for a in m.plan(1).assignments())
            if os.environ.get("LSTREAM_MOE_KERNELS") != "0":  # (=0: the first path, the same tokens)
                assert len(dev._moe_w) == {"": n_moe, "cpu_moe": 0, "n_cpu_moe": n_moe - 1}["".join(kw)]
            assert _greedy(m, ids[:24]) == want, kw
        finally:
            m.close()


def test_decode_one_hop_each_way(mixtral3):
    """--cpu-moe decode: everything on the device but the experts; per MoE layer the CPU split is the
    expert op alone, fed by the layer's normed activations and router logits (one crossing each way)."""
    d, ids, _ = mixtral3
    m, _ = _model(d / "st", cpu_moe=True)
    try:
        plan = m.plan(1)
        assert [s.backend for s in plan.splits] == ["fake", "cpu"] * 3 + ["fake"]
        for s in plan.splits[1::2]:
            (a,) = s.assignments
            assert a.node.op is Op.MOE and a.cause == "data on cpu"
            assert [m.graph.nodes[i].name.split(".")[-1] for i in s.copy_inputs] == ["ffn_norm", "router"]
        # the device's part of each layer between two expert ops is one static segment (a CUDA graph
        # on a GPU): layer 0 up to its router, then from each layer's residual add to the next router
        segs = m.runner.replay.segments(plan, _ctx(m, 1))
        flat = list(plan.assignments())
        assert len(segs) == 3
        for s, e, _ in segs:
            assert flat[e].node.op is Op.MOE and flat[e].backend == "cpu"
            assert all(a.backend == "fake" for a in flat[s:e])
        out = _greedy(m, ids[:4])
        assert m.runner.replay.segment_runs == len(out) == 8  # the 4-token prompt, then 7 steps
        # each expert op between two segments: read back with one wait, routed and computed on the
        # host, sent up without one (StepReplay._host_moe), not through the executor's generic hop
        assert m.runner.replay.host_moe_runs == 7 * 3  # (the prompt uploads its experts: on the device)
    finally:
        m.close()


def _ctx(m, n):
    from lstream.core.executor import RunContext
    return RunContext(tokens=[0] * n, positions=list(range(n)), n_past=0, kv=m.kv, residency=m.residency)


@pytest.mark.parametrize("layer_major", [True, False])
def test_prefill_uploads_each_expert_once_per_prompt(mixtral3, layer_major):
    """Every routed expert uploaded (policy Always): layer-major ubatches copy each expert of each layer
    once per prompt although the device holds two layers' experts; one ubatch after another copy
    them again for each ubatch."""
    d, ids, ref = mixtral3
    m, dev = _model(d / "st", Always(), cpu_moe=True, layer_major=layer_major)
    try:
        out = m.eval(ids, logits="last")
        assert float(((out - ref[-1]) ** 2).sum() / (ref[-1] ** 2).sum()) < MAX_NMSE
        log = dev.expert_streamer.log
        assert len(log) == len(set(log)) if layer_major else len(log) > len(set(log))
        assert {layer for layer, _ in log} == {0, 1, 2}
        # most experts routed per ubatch: the next layer's are copied ahead of its routing
        assert dev.expert_streamer.prefetches > 0
    finally:
        m.close()


def test_expert_threshold_decides_per_expert(mixtral3, capsys):
    """Tokens routed to each expert decide its upload; the others are computed by the CPU inside the op."""
    d, ids, ref = mixtral3
    pol = BatchThreshold()
    pol.expert_threshold = 5
    m, dev = _model(d / "st", pol, cpu_moe=True)
    asked, host_calls = [], []
    real_ask, real_host = pol.should_upload_expert, m.cpu.moe_experts
    pol.should_upload_expert = lambda op, e, n, t: asked.append((n, t)) or real_ask(op, e, n, t)
    m.cpu.moe_experts = lambda node, x, i, w: host_calls.append((i >= 0).sum()) or real_host(node, x, i, w)
    try:
        assert set(_moe_backends(m, 4)) == {"cpu"}  # no expert can reach 5 tokens
        print_plan(m, m.plan(4))
        assert capsys.readouterr().out.count("data on cpu (threshold(32), expert threshold 5 tokens: no expert "
                                             "reaches it at 4 tokens)") == 3
        m.plan(16)  # planned first: the scheduler asks too (with n_routed = 16: could any expert reach it?)
        asked.clear()
        out = m.eval(ids[:16], logits="all")
        assert float(((out - ref[:16]) ** 2).sum() / (ref[:16] ** 2).sum()) < MAX_NMSE
        n_up = sum(n >= 5 for n, _ in asked)
        assert 0 < n_up < len(asked) and dev.expert_streamer.uploads == n_up and host_calls
        assert all(t == 16 for _, t in asked) and sum(n for n, _ in asked) == 16 * 2 * 3  # top-2, 3 layers
        print_plan(m, m.plan(16))
        text = capsys.readouterr().out
        assert "experts: 8 per MoE layer, 2 per token" in text and "when 5+ tokens" in text
        assert text.count("expert threshold 5 tokens: routed first") == 3
    finally:
        m.close()


@pytest.mark.parametrize("fmt", ["gguf", "st"])
def test_decode_shares_experts_with_the_device(mixtral3, fmt):
    """decode_experts = 1 (--cpu-moe): a decode step uploads each layer's most routed expert and the
    CPU computes the other (top-2), both in the op; the same greedy tokens as on the CPU alone."""
    d, ids, _ = mixtral3
    path = d / "mixtral-Q8_0.gguf" if fmt == "gguf" else d / "st"
    cpu = Model(load_model(path), n_ctx=128, n_ubatch=16, device=None, load_tokenizer=False)
    want = _greedy(cpu, ids[:5])
    cpu.close()
    pol = BatchThreshold()
    pol.decode_experts = 1
    m, dev = _model(path, pol, cpu_moe=True)
    host_pairs = []
    real_host = m.cpu.moe_experts
    m.cpu.moe_experts = lambda node, x, i, w: host_pairs.append(int((i >= 0).sum())) or real_host(node, x, i, w)
    try:
        assert set(_moe_backends(m, 1)) == {"fake"}  # the op on the device, which hands the CPU its pairs
        assert _greedy(m, ids[:5]) == want
        assert dev.expert_streamer.uploads >= 3 * 7  # per step and layer at least one expert
        assert host_pairs and set(host_pairs[-3:]) == {1}  # a decode step: the CPU's expert of each layer
    finally:
        m.close()
