"""The MoE expert kernels (backends/cuda/moe_kernels.py): fused decode GEMVs and the grouped GEMM.

Oracle: every expert dequantized by gguf.quants.dequantize, the routed SwiGLU FFNs summed with
their routing weights in float64. Tolerance: normalized MSE sum((y - ref)^2) / sum(ref^2) <= 1e-4
(NMSE_TOL). Decode multiplies fp32 weights (exact fp16 scale * quant) by fp32 activations, so only
fp32 rounding of the sums separates it from the oracle (measured ~1e-13; checked at 1e-9 too).
Prefill rounds both operands to bf16 as qgemm does (~1e-5 per GEMM, see test_qgemm.py).

CPU: the kernels run in Triton's interpreter (the `interp` fixture installs interpreted copies of
qgemm's and moe_kernels' Triton functions), small shapes: 4-6 experts, rows not a multiple of the
tile, several k steps, repeated experts among the tokens, an expert nobody picked. GPU (marker gpu):
Qwen3-30B-A3B expert shapes against the torch fallback of the same operands.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lstream.backends.cuda import moe_kernels as mk
from lstream.backends.cuda import qgemm as qg
from lstream.backends.cuda import repack
from lstream.core.qtypes import QTYPE_INFO, QType
from test_cuda_kernels import _data, ck_scale_fields  # random GGUF blocks, their scale fields

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not qg.HAVE_TRITON, reason="needs triton")

NMSE_TOL = 1e-4
TYPES = [QType.Q4_0, QType.Q5_1, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K]


def nmse(y, ref) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    assert torch.isfinite(y).all()
    return float(((y - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.fixture
def interp(monkeypatch):
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for mod in (qg, mk):
        for name, v in list(vars(mod).items()):
            if isinstance(v, (triton.runtime.JITFunction, InterpretedFunction)):
                monkeypatch.setattr(mod, name, InterpretedFunction(v.fn))


def _oracle(a: np.ndarray, qt: QType, rows: int, cols: int) -> torch.Tensor:
    w = gguf.quants.dequantize(a, gguf.GGMLQuantizationType(int(qt)))
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)).reshape(rows, cols)


def _experts(qt, n_expert, rows, cols, seed, packed=False, dev="cpu", oracle=True):
    """(Experts on `dev`, float64 oracle (n_expert, rows, cols)), scales as tools/synth_model writes them."""
    a = _data(qt, n_expert * rows, cols, seed)
    info = QTYPE_INFO[qt]
    blk = a.reshape(-1, info.type_size)
    rng = np.random.default_rng(seed)
    for off, mag in ck_scale_fields(qt):  # every scale field (K-quants' dmin too) as synth_model's weights
        blk[:, off:off + 2] = (rng.uniform(0.5, 1.5, blk.shape[0]) * mag).astype(np.float16) \
            .view(np.uint8).reshape(-1, 2)
    t = torch.from_numpy(a).to(dev)
    w = repack.repack(t, qt, n_expert * rows, cols) if packed else t.view(n_expert * rows, -1)
    ref = _oracle(a, qt, n_expert * rows, cols).view(n_expert, rows, cols) if oracle else None
    return mk.Experts(qt, n_expert, rows, cols, w), ref


def _route(T, k, n_expert, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, n_expert, generator=g)
    logits[:, -1] = -1e9  # the last expert: never picked
    w, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


def reference(x, ids, wts, gu_ref, d_ref):
    ffn = gu_ref.shape[1] // 2
    y = torch.zeros(x.shape[0], d_ref.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = gu_ref[e] @ x[t].double()
            h = torch.nn.functional.silu(g[:ffn]) * g[ffn:]
            y[t] += float(wts[t, j]) * (d_ref[e] @ h)
    return y


def _case(qt, packed, n_expert=5, dim=224, ffn=96, seed=0):
    """K of 7 and 3 blocks (one k step of 32 each); the K-quants need whole super-blocks: 256."""
    if QTYPE_INFO[qt].block_size == 256:
        dim = ffn = 256
    gu, gu_ref = _experts(qt, n_expert, 2 * ffn, dim, seed, packed)
    dn, d_ref = _experts(qt, n_expert, dim, ffn, seed + 1, packed)
    return gu, gu_ref, dn, d_ref


def _cases():
    for qt in TYPES:
        yield pytest.param(qt, False, id=qt.name)
        if qt in repack.TYPES:
            yield pytest.param(qt, True, id=f"{qt.name}-packed")


@pytest.mark.parametrize("qt,packed", list(_cases()))
def test_decode_matches_gguf(interp, qt, packed):
    gu, gu_ref, dn, d_ref = _case(qt, packed)
    T, k = 3, 2
    ids, wts = _route(T, k, gu.n_expert, seed=int(qt))
    ids[2] = ids[0]  # two tokens on the same experts
    x = torch.randn(T, gu.n_cols, generator=torch.Generator().manual_seed(5))
    ref = reference(x, ids, wts, gu_ref, d_ref)
    # tiles of 32 rows (96 gate rows: 3; 224 down rows: 7) and of 64 (a part tile) with other k steps;
    # the default configs' narrow tiles only on the GPU (many programs: slow in the interpreter)
    bk = 128 if QTYPE_INFO[qt].block_size == 256 else 64
    for bn, step in ((32, 256), (64, bk))[:2 if qt in (QType.Q4_0, QType.Q4_K) else 1]:  # the interpreter is slow
        cfg = ((bn, qg._bk(step, qt, gu.n_cols), 4), (bn, qg._bk(step, qt, dn.n_cols), 4))
        y = mk.decode(x, ids, wts, gu, dn, cfg=cfg)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert nmse(y, ref) <= 1e-9, cfg  # fp32 throughout (NMSE_TOL is the contract; this is what it does)
    assert nmse(mk._decode_torch(x, ids, wts, gu, dn), ref) <= 1e-9  # the fallback, same function


@pytest.mark.parametrize("qt,packed", list(_cases()))
def test_prefill_matches_gguf(interp, qt, packed):
    gu, gu_ref, dn, d_ref = _case(qt, packed, seed=3)
    T, k = 21, 2
    ids, wts = _route(T, k, gu.n_expert, seed=int(qt) + 7)
    x = torch.randn(T, gu.n_cols, generator=torch.Generator().manual_seed(6))
    ref = reference(x, ids, wts, gu_ref, d_ref)
    cfg1 = qg.fit(qg.Cfg(16, 32, 64, 1, 1, 4, 2), qt, gu.n_cols)
    cfg2 = qg.fit(qg.Cfg(16, 32, 64, 0, 1, 4, 2), qt, dn.n_cols)  # both dot orders
    # fp16 operands: the interpreter truncates to bf16 (< 2^-7) where the GPU rounds (2^-9), which
    # over two chained GEMMs measures ~1e-4 against ~2e-5 rounded; fp16 keeps 11 bits either way
    y = mk.prefill(x.half(), ids, wts, gu, dn, cfgs=(cfg1, cfg2))
    assert y.shape == ref.shape and y.dtype == torch.float32 and nmse(y, ref) <= NMSE_TOL
    if qt == QType.Q4_0:
        assert nmse(mk.prefill(x, ids, wts, gu, dn, cfgs=(cfg1, cfg2)), ref) <= 5e-4  # bf16, truncated


def _split(gu: mk.Experts):
    """A stacked gate|up (GGUF blocks) as two Experts, as the streamed path's slots hold them."""
    w = gu.w.view(gu.n_expert, 2, gu.n_rows // 2, -1)
    return [mk.Experts(gu.qtype, gu.n_expert, gu.n_rows // 2, gu.n_cols, w[:, i].reshape(-1, w.shape[-1]).clone())
            for i in (0, 1)]


@pytest.mark.parametrize("interpreted", [True, False], ids=["interpreter", "torch"])
def test_prefill_gate_up_apart_and_skipped_pairs(request, interpreted, monkeypatch):
    """The streamed path's call: gate and up as two tensors, pairs with id -1 (the CPU's) left out."""
    if interpreted:
        request.getfixturevalue("interp")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qt = QType.Q4_K
    gu, gu_ref, dn, d_ref = _case(qt, False, seed=8)
    T, k = 13, 2
    ids, wts = _route(T, k, gu.n_expert, seed=3)
    ids[::3, 1] = -1
    ids[4] = -1
    x = torch.randn(T, gu.n_cols, generator=torch.Generator().manual_seed(2))
    ref = reference(x, ids.clamp(min=0), torch.where(ids >= 0, wts, 0.0), gu_ref, d_ref)
    gate, up = _split(gu)
    cfg = qg.fit(qg.Cfg(16, 32, 64, 1, 1, 4, 2), qt, gu.n_cols)
    y = mk.prefill(x.half(), ids, wts, gate, dn, cfgs=(cfg, qg.fit(cfg, qt, dn.n_cols)), up=up)
    assert nmse(y, ref) <= NMSE_TOL and torch.equal(y[4], torch.zeros_like(y[4]))


@pytest.mark.parametrize("interpreted", [True, False], ids=["interpreter", "torch"])
@pytest.mark.parametrize("qt", [QType.Q4_0, QType.Q6_K], ids=lambda q: q.name)
def test_decode_gate_up_apart(request, interpreted, monkeypatch, qt):
    """A decode step's uploaded experts (their slot holds gate and up as two tensors): the same
    numbers as the stacked kernel, against gguf + float64."""
    if interpreted:
        request.getfixturevalue("interp")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gu, gu_ref, dn, d_ref = _case(qt, False, seed=4)
    ids, wts = _route(2, 3, gu.n_expert, seed=5)
    x = torch.randn(2, gu.n_cols, generator=torch.Generator().manual_seed(7))
    ref = reference(x, ids, wts, gu_ref, d_ref)
    gate, up = _split(gu)
    bk = 128 if QTYPE_INFO[qt].block_size == 256 else 64
    cfg = ((32, qg._bk(bk, qt, gu.n_cols), 4), (32, qg._bk(bk, qt, dn.n_cols), 4))
    y = mk.decode(x, ids, wts, gate, dn, cfg=cfg, up=up)
    assert nmse(y, ref) <= 1e-9
    if interpreted:
        assert torch.equal(y, mk.decode(x, ids, wts, gu, dn, cfg=cfg))


@pytest.mark.parametrize("n_expert,top_k,norm", [(128, 8, True), (128, 8, False), (60, 4, True), (8, 2, False)])
def test_route_kernel_matches_core_route(interp, n_expert, top_k, norm):
    """The fused router (one launch): the same experts in the same order as core/moe.py's float64
    route, the weights to fp32 rounding (relative 1e-5)."""
    from lstream.core.moe import route
    logits = torch.from_numpy(np.random.default_rng(n_expert + top_k).standard_normal((7, n_expert)).astype(np.float32) * 3)
    ids, w = mk.route(logits, top_k, norm)
    ri, rw = route(logits.numpy(), top_k, norm)
    assert ids.dtype == torch.int64 and np.array_equal(ids.numpy(), ri)
    np.testing.assert_allclose(w.numpy(), rw, rtol=1e-5, atol=0)


def test_tile_table():
    """Every sorted pair in exactly one tile of its expert; the other tiles marked -1."""
    ids, _ = _route(37, 3, 6, seed=2)
    for bm in (4, 16):
        order, te, tm, tend = mk.tile_table(ids, 6, bm)
        flat = ids.reshape(-1)
        assert torch.equal(flat[order], torch.sort(flat, stable=True).values)
        seen = torch.zeros(flat.numel(), dtype=torch.int32)
        for e, m0, end in zip(te.tolist(), tm.tolist(), tend.tolist()):
            if e < 0:
                continue
            s = torch.arange(m0, min(m0 + bm, end))
            assert (flat[order[s]] == e).all() and len(s) > 0
            seen[s] += 1
        assert (seen == 1).all()
        assert te.numel() == flat.numel() // bm + 7  # + 1: the pairs with ids < 0, if any


def test_grouped_gemm_gathered_rows(interp):
    """The grouped GEMM alone: rows gathered by token, each against its own expert; bf16 operands."""
    qt = QType.Q4_0
    ex, ref = _experts(qt, 4, 48, 128, seed=9)
    ids, _ = _route(11, 2, 4, seed=4)
    x = torch.randn(11, 128, generator=torch.Generator().manual_seed(3))
    cfg = qg.fit(qg.Cfg(16, 32, 64, 1, 1, 4, 2), qt, 128)
    order, *table = mk.tile_table(ids, 4, cfg.bm)
    out = mk.grouped(x, (order // 2).int(), table, ex, 22, out_dtype=torch.float32, cfg=cfg)
    want = torch.stack([ref[int(ids.reshape(-1)[p])] @ x[int(p) // 2].double() for p in order])
    assert nmse(out, want) <= NMSE_TOL


def test_selfcheck_in_the_interpreter(interp, monkeypatch):
    """The start-up check that gates the kernels on a GPU (selfcheck._moe) passes with them interpreted
    (decode tiles of 64 rows: the default narrow ones make hundreds of programs, minutes here)."""
    from lstream.backends.cuda import selfcheck
    real = mk.gemv_cfg
    monkeypatch.setattr(mk, "gemv_cfg", lambda ex, n, p: (64,) + real(ex, n, p)[1:])
    assert selfcheck._moe(torch.device("cpu"))


def test_fallback_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gu, gu_ref, dn, d_ref = _case(QType.Q8_0, False)
    ids, wts = _route(4, 2, gu.n_expert, seed=1)
    x = torch.randn(4, gu.n_cols, generator=torch.Generator().manual_seed(5))
    ref = reference(x, ids, wts, gu_ref, d_ref)
    assert nmse(mk.decode(x, ids, wts, gu, dn), ref) <= 1e-9
    assert nmse(mk.prefill(x, ids, wts, gu, dn), ref) <= 1e-9


@pytest.fixture
def interp_all(interp, monkeypatch):
    """Interpreted copies of every Triton function of the CUDA backend (the dense path's too)."""
    import importlib
    import pkgutil
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    import lstream.backends.cuda as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, v in list(vars(mod).items()):
            if isinstance(v, triton.runtime.JITFunction):
                monkeypatch.setattr(mod, name, InterpretedFunction(v.fn))


def test_backend_op_in_the_interpreter(interp_all, tmp_path):
    """The CUDA backend's MOE op on the fake device with the kernels interpreted (tiny Qwen3-MoE, Q8_0):
    fp32 greedy tokens equal the CPU's (decode GEMVs, prefill in fp32 by GEMVs too), bf16 logits of a
    ubatch of 10 tokens (> SMALL_BATCH: the grouped GEMMs) close to the CPU's, with the experts resident
    and with them in host memory (--cpu-moe: uploaded into the expert slots, read there by id). ~2 minutes."""
    pytest.importorskip("transformers")
    from fake_device import FakeDeviceBackend
    from lstream.api import Model
    from lstream.core.policy import Always, BatchThreshold
    from lstream.loaders.model_file import load_model
    from lstream.tools import tiny_moe
    d, ids, _ = tiny_moe.write("qwen3moe", tmp_path, n_tokens=20, gguf_types=("Q8_0",))
    path = d / "qwen3moe-Q8_0.gguf"

    def run(dtype=None, **kw):
        pol = Always() if kw else BatchThreshold()
        dev = FakeDeviceBackend(pol, dtype=dtype) if dtype else None
        m = Model(load_model(path), n_gpu_layers=99 if dev else 0, device_backend=dev, device=None, n_ctx=64,
                  n_ubatch=16, load_tokenizer=False, **({"policy": pol} if dev else {}), **kw)
        try:
            assert dev is None or len(dev._moe_w) == (0 if kw else 1)
            gen = [] if kw else list(m.generate_tokens(ids[:6], 2, stop_at_eos=False))
            m.reset()
            logits = m.eval(ids[:10], logits="all")
            assert not kw or dev.expert_streamer.uploads > 0
            return gen, logits
        finally:
            m.close()

    want, ref = run()
    gen, _ = run("fp32")
    assert gen == want
    for kw in ({}, {"cpu_moe": True}):  # resident; in host memory, every routed expert uploaded (Always)
        _, logits = run("bf16", **kw)
        assert float(((logits - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-3, kw  # as test_moe_gpu's bf16 test


def test_prefetched_layer_routed_on_the_device(interp_all, tmp_path):
    """--cpu-moe prompt: the first MoE layer routes on the host and uploads every expert, which
    prefetches the next MoE layer whole; that layer is then routed and computed on the device with no
    host sync (ExpertStreamer.acquire_all). Its logits stay those of the CPU (bf16 bound as above)."""
    pytest.importorskip("transformers")
    from fake_device import FakeDeviceBackend
    from lstream.api import Model
    from lstream.core.policy import Always
    from lstream.loaders.model_file import load_model
    from lstream.tools import tiny_moe
    d, ids, _ = tiny_moe.write("qwen3moe", tmp_path, n_tokens=20, gguf_types=("Q8_0",), n_layer=3)
    path = d / "qwen3moe-Q8_0.gguf"
    cpu = Model(load_model(path), device=None, n_ctx=64, n_ubatch=16, load_tokenizer=False)
    ref = cpu.eval(ids[:16], logits="all")
    cpu.close()
    pol = Always()
    dev = FakeDeviceBackend(pol, dtype="bf16")
    m = Model(load_model(path), n_gpu_layers=99, device_backend=dev, device=None, n_ctx=64, n_ubatch=16,
              load_tokenizer=False, policy=pol, cpu_moe=True)
    try:
        logits = m.eval(ids[:16], logits="all")
        st = dev.expert_streamer
        moe_layers = sorted(st.layers)
        assert len(moe_layers) == 2 and st.prefetches >= 1 and st.whole_runs == 1
        assert {e for layer, e in st.log if layer == moe_layers[1]} == set(range(tiny_moe.N_EXPERT))
        assert float(((logits - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-3
    finally:
        m.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qt,packed", [
    (QType.Q4_0, False), (QType.Q4_0, True), (QType.Q8_0, False), (QType.Q8_0, True), (QType.Q4_K, False),
    (QType.Q6_K, False)], ids=str)
def test_gpu_qwen3_30b_shapes(qt, packed):
    """128 experts of 768 x 2048, top 8: decode at 1 and 8 tokens, prefill at 512, vs the torch fallback.
    Repacked experts decode by the int8 GEMVs (moe_q8.py: x and h quantized per 32 values, as the
    dense gemv_q8's 5e-4), and by the float kernels with int8=False (fp32: 1e-9)."""
    E, dim, ffn, k = 128, 2048, 768, 8
    gu, _ = _experts(qt, E, 2 * ffn, dim, 1, packed, dev="cuda", oracle=False)
    dn, _ = _experts(qt, E, dim, ffn, 2, packed, dev="cuda", oracle=False)
    errs = {}
    for T in (1, 8, 512):
        ids, wts = _route(T, k, E, seed=T)
        ids, wts = ids.cuda(), wts.cuda()
        x = torch.randn(T, dim, device="cuda")
        ref = mk._decode_torch(x, ids, wts, gu, dn)
        if T > 8:
            errs["prefill", T] = (nmse(mk.prefill(x.bfloat16(), ids, wts, gu, dn), ref), NMSE_TOL)
            continue
        errs["decode", T] = (nmse(mk.decode(x, ids, wts, gu, dn), ref), 5e-4 if packed else 1e-9)
        errs["fp32 decode", T] = (nmse(mk.decode(x, ids, wts, gu, dn, int8=False), ref), 1e-9)
    assert all(e <= tol for e, tol in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qt", [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0], ids=str)
@pytest.mark.parametrize("dim,ffn", [(2048, 768), (224, 96), (4096, 1408)], ids=str)
@pytest.mark.parametrize("outliers", [0.0, 3000.0], ids=["plain", "outliers"])
def test_gpu_int8_expert_gemvs_against_gguf(qt, dim, ffn, outliers):
    """moe_q8's GEMVs on repacked experts against gguf's dequantization in float64 (tolerance as the
    dense int8 GEMV's, 5e-4), for every 32-block type, with rows and blocks that fill no tile: 224
    columns are 7 blocks (one thread each), 96 rows; a token routed twice to one expert is not
    possible, two tokens on the same experts are. With outlier features (+3000 every 97th) a block's
    int8 scale follows its largest value, as llama.cpp's q8_1 activations do."""
    from lstream.backends.cuda import moe_q8
    E, k = 6, 3
    gu, gu_ref = _experts(qt, E, 2 * ffn, dim, 11, True, dev="cuda")
    dn, d_ref = _experts(qt, E, dim, ffn, 12, True, dev="cuda")
    for T in (1, 4):
        ids, wts = _route(T, k, E, seed=T + 20)
        if T > 1:
            ids[1] = ids[0]
        x = torch.randn(T, dim, generator=torch.Generator().manual_seed(T)) * 3
        x[:, 5::97] += outliers  # real models' outlier features: thousands, SwiGLU outputs past fp16's range
        assert moe_q8.usable(x.cuda(), gu.w)
        y = mk.decode(x.cuda(), ids.cuda(), wts.cuda(), gu, dn)
        assert y.shape == (T, dim) and nmse(y, reference(x, ids, wts, gu_ref, d_ref)) <= 5e-4, T
