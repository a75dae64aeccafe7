"""Mixtures of experts on the CPU: Qwen3-MoE, Mixtral (llama with experts) and Qwen2-MoE (a shared
expert) on tiny random transformers checkpoints (tools/tiny_moe.py), loaded from the safetensors
directory (per-expert tensors gathered into 3-D entries) and from GGUF files written by
tools/write_gguf.py (F32 and Q8_0 3-D expert tensors), against transformers' float32 logits; the
grouped decode kernels against the per-expert matmuls on every packed layout."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import lstream  # noqa: E402
from lstream.backends.cpu import moe as cpu_moe  # noqa: E402
from lstream.core.moe import expert_counts, group, route  # noqa: E402
from lstream.core.ops import Op  # noqa: E402
from lstream.core.qtypes import QType  # noqa: E402
from lstream.core.residency import HOST, ResidencyMap, TensorEntry, moe_overrides  # noqa: E402
from lstream.tools import tiny_moe  # noqa: E402

MAX_NMSE_F32 = 1e-10  # float32 end to end: rounding only (measured 3e-13 .. 9e-13)
MAX_NMSE_Q8 = 1e-7  # Q8_0 file vs transformers on its dequantized weights: int16 activations (1e-10 .. 8e-8)


@pytest.fixture(scope="module", params=tiny_moe.ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    d, ids, ref = tiny_moe.write(arch, tmp_path_factory.mktemp(arch))
    return arch, d, ids, ref


def _nmse(ours, ref) -> float:
    return float(((ours - ref) ** 2).sum() / (ref ** 2).sum())


def _check(ours, ref, what, limit):
    nmse = _nmse(ours, ref)
    print(f"\n{what}: nmse {nmse:.2e}")
    assert ours.shape == ref.shape
    assert nmse < limit, f"{what}: nmse {nmse:.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("fmt", ["safetensors", "F32"])
def test_logits_match_transformers(tiny, fmt):
    arch, d, ids, ref = tiny
    path = d / "st" if fmt == "safetensors" else d / f"{arch}-{fmt}.gguf"
    with lstream.load(str(path), n_ctx=128, load_tokenizer=False) as m:
        assert m.config.arch == tiny_moe.GGUF_ARCH[arch]
        assert (m.config.n_expert, m.config.n_expert_used) == (tiny_moe.N_EXPERT, tiny_moe.TOP_K)
        moe = [n for n in m.graph.nodes if n.op is Op.MOE]
        assert len(moe) == (1 if arch == "qwen3moe" else 2)  # qwen3moe's layer 1 is dense (mlp_only_layers)
        assert m.residency[moe[0].weights[0]].shape[0] == tiny_moe.N_EXPERT
        assert len(moe[0].inputs) == (3 if arch == "qwen2moe" else 2)  # + the shared expert
        _check(m.eval(ids, logits="all"), ref, f"{arch} {fmt}", MAX_NMSE_F32)
        m.reset()  # prefill in pieces, then decode steps over the cache
        m.eval(ids[:20])
        m.eval(ids[20:-3])
        for i in range(3, 0, -1):
            _check(m.eval([ids[-i]])[None], ref[-i:len(ref) - i + 1], f"{arch} {fmt} decode", MAX_NMSE_F32)


def test_q8_0_matches_its_dequantized_weights(tiny, monkeypatch):
    """The Q8_0 file against transformers running the same (dequantized) weights: prefill through the
    per-expert kernels (an expert with few of the prompt's tokens through the pair kernels), decode
    steps through the grouped pair kernels alone (counted)."""
    arch, d, ids, _ = tiny
    path = d / f"{arch}-Q8_0.gguf"
    ref = tiny_moe.reference_from_gguf(arch, d, path, ids)
    calls = {"_pairs": 0, "_by_expert": 0}
    for name in calls:
        def spy(*a, _real=getattr(cpu_moe, name), _name=name):
            calls[_name] += 1
            return _real(*a)
        monkeypatch.setattr(cpu_moe, name, spy)
    with lstream.load(str(path), n_ctx=128, load_tokenizer=False) as m:
        assert m.residency[next(n for n in m.graph.nodes if n.op is Op.MOE).weight].qtype == QType.Q8_0
        _check(m.eval(ids, logits="all"), ref, f"{arch} Q8_0 prefill", MAX_NMSE_Q8)
        assert calls["_by_expert"] > 0
        m.reset()
        m.eval(ids[:-4])
        before = dict(calls)
        for i in range(4, 0, -1):
            _check(m.eval([ids[-i]])[None], ref[-i:len(ref) - i + 1], f"{arch} Q8_0 decode", MAX_NMSE_Q8)
        assert calls["_pairs"] - before["_pairs"] == 4 * sum(n.op is Op.MOE for n in m.graph.nodes)
        assert calls["_by_expert"] == before["_by_expert"]


def test_quantize_at_load_gathers_experts(tiny):
    """--quantize q8_0 on the safetensors directory: every expert quantized into one 3-D array of blocks."""
    arch, d, ids, ref = tiny
    with lstream.load(str(d / "st"), n_ctx=128, load_tokenizer=False, quantize="q8_0") as m:
        e = m.residency["blk.0.ffn_up_exps.weight"]
        assert e.qtype == QType.Q8_0 and e.data.shape[:2] == e.shape[:2] and e.expert(3).shape[0] == e.shape[1]
        out = m.eval(ids, logits="all")
    assert _nmse(out, ref) < 2e-2  # quantization error of tiny random weights (measured 3e-4 .. 1.5e-3)


# -- the pieces --------------------------------------------------------------------------------------

def test_route_as_transformers():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, 16)).astype(np.float32)
    for norm in (True, False):
        ids, w = route(logits, 4, norm)
        p = torch.softmax(torch.from_numpy(logits), -1)
        tw, ti = torch.topk(p, 4, -1)
        if norm:
            tw = tw / tw.sum(-1, keepdim=True)
        assert (ids == ti.numpy()).all()
        assert np.allclose(w, tw.numpy(), atol=1e-7)
    g = group(ids, 16)
    assert (g.counts() == expert_counts(ids, 16)[g.experts]).all()
    for j, e in enumerate(g.experts):
        assert (ids.reshape(-1)[g.pairs[g.starts[j]:g.starts[j + 1]]] == e).all()


def test_numba_route_as_core_route():
    """The decode router of the host-expert fast path (backends/cpu/moe_kernels.route) gives
    core/moe.route's experts, in its order, and its weights."""
    from lstream.backends.cpu import moe_kernels as K
    rng = np.random.default_rng(3)
    for T, E, k, norm in ((1, 128, 8, True), (4, 128, 8, False), (3, 8, 2, True), (2, 60, 4, True), (1, 4, 4, False)):
        logits = (rng.standard_normal((T, E)) * 4).astype(np.float32)
        ids, w = np.empty((T, k), np.int32), np.empty((T, k), np.float32)
        K.route(logits, k, norm, ids, w)
        want_ids, want_w = route(logits, k, norm)
        assert (ids == want_ids).all()
        np.testing.assert_allclose(w, want_w, rtol=1e-6, atol=0)
    ids, w = np.empty((1, 3), np.int32), np.empty((1, 3), np.float32)
    K.route(np.full((1, 6), np.nan, np.float32), 3, True, ids, w)  # (the engine reports NaN before this)
    assert sorted(ids[0].tolist()) == [0, 1, 2]  # ids stay valid experts: no out-of-range read


@pytest.mark.parametrize("act8", [False, True])
@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q5_K,
                                   QType.Q6_K])
def test_grouped_decode_kernels_every_layout(qtype, act8):
    """The pair kernels (all selected experts in one call) against per-expert matmul(), with int16
    and with int8 activations (the latter for the "nibw" layouts: Q4_0, Q4_1, by host size)."""
    from lstream.backends.cpu.backend import CPUBackend
    from test_cpu_kernels import make_raw
    n_exp, E, F = 6, 256, 256  # K-quants need 256-wide rows
    rm = ResidencyMap(1)
    for i, (name, rows, cols) in enumerate((("gate", F, E), ("up", F, E), ("down", E, F))):
        raw = make_raw(qtype, n_exp * rows, cols, seed=i).reshape(n_exp, rows, -1)
        rm.add(TensorEntry(f"blk.0.ffn_{name}_exps.weight", 0, (n_exp, rows, cols), qtype, raw.nbytes, raw))
    be = CPUBackend(n_threads=2)
    be.act8 = act8
    be.residency = rm
    node = type("N", (), {"weights": tuple(f"blk.0.ffn_{n}_exps.weight" for n in ("gate", "up", "down"))})()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, E)).astype(np.float32)
    ids, w = route(rng.standard_normal((3, n_exp)), 2, True)
    ids[1, 1] = -1  # a pair another backend computes
    ex = [cpu_moe.experts_of(be, n) for n in node.weights]
    assert all(e.grouped for e in ex)
    a = cpu_moe._pairs(*ex, x, ids, w)
    b = cpu_moe._by_expert(be, *ex, x, ids, w)
    assert _nmse(a, b) < 1e-10
    if act8:  # against the int16 activations: int8 rounding only (NMSE measured ~1e-5)
        assert ex[0].whole.int8_act == (qtype in (QType.Q4_0, QType.Q4_1))
        be16 = CPUBackend(n_threads=2)
        be16.residency = rm
        c = cpu_moe._pairs(*[cpu_moe.experts_of(be16, n) for n in node.weights], x, ids, w)
        assert _nmse(a, c) < 1e-3


def test_rare_experts_of_a_batch_by_the_pair_kernels():
    """A batch past SMALL_BATCH: experts with fewer than RARE_TOKENS of its tokens go through the
    grouped pair kernels, the others through per-expert products; together as per-expert alone."""
    from lstream.backends.cpu.backend import CPUBackend
    from test_cpu_kernels import make_raw
    n_exp, E, F, T, k = 8, 256, 128, 24, 2
    rm = ResidencyMap(1)
    for i, (name, rows, cols) in enumerate((("gate", F, E), ("up", F, E), ("down", E, F))):
        raw = make_raw(QType.Q4_0, n_exp * rows, cols, seed=i).reshape(n_exp, rows, -1)
        rm.add(TensorEntry(f"blk.0.ffn_{name}_exps.weight", 0, (n_exp, rows, cols), QType.Q4_0, raw.nbytes, raw))
    be = CPUBackend(n_threads=2)
    be.residency = rm
    node = type("N", (), {"weights": tuple(f"blk.0.ffn_{n}_exps.weight" for n in ("gate", "up", "down"))})()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, E)).astype(np.float32)
    ids = np.stack([np.full(T, 0), np.full(T, 1)], axis=1).astype(np.int32)  # experts 0, 1: every token
    ids[3, 1], ids[9, 1], ids[17, 0] = 5, 5, 6  # 5: two tokens, 6: one (rare)
    ids[20, 1] = -1  # a pair another backend computes
    w = rng.random((T, k)).astype(np.float32)
    counts = expert_counts(ids, n_exp)
    assert counts[5] == 2 and counts[6] == 1 and counts[0] >= cpu_moe.RARE_TOKENS
    ex = [cpu_moe.experts_of(be, n) for n in node.weights]
    got = cpu_moe.experts_ffn(be, node, x, ids, w)
    want = cpu_moe._by_expert(be, *ex, x, ids, w)
    assert _nmse(got, want) < 1e-10


def test_residency_knows_experts_as_units():
    rm = ResidencyMap(2)
    for il in range(2):
        rm.add(TensorEntry(f"blk.{il}.attn_q.weight", il, (8, 32), QType.F32, 1024, None))
        for k in ("gate", "up", "down"):
            rm.add(TensorEntry(f"blk.{il}.ffn_{k}_exps.weight", il, (4, 8, 32), QType.F32, 4096, None))
    units = rm.experts(1)
    assert len(units) == 4 and units[2].expert == 2 and units[2].nbytes == 3 * 1024
    assert rm.experts(0)[0].names == ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight",
                                      "blk.0.ffn_down_exps.weight")
    rm.assign(99, "cuda", moe_overrides(1))  # --n-cpu-moe 1: layer 0's experts stay on the host
    assert rm["blk.0.ffn_up_exps.weight"].home == HOST and rm["blk.1.ffn_up_exps.weight"].home == "cuda"
    assert rm.layer_home(0) == "cuda"  # attention (and K/V) where the layer's other weights are
    rm.assign(99, "cuda", [("exps", "cpu")])  # -ot exps=cpu
    assert {e.home for e in rm if e.n_expert} == {HOST} and rm.layer_home(1) == "cuda"
