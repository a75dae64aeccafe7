"""Quantized GEMV (backends/cuda/gemv.py) against dequantize-then-matmul.

Reference: cuda.dequant.dequantize(..., fp32) (itself checked against gguf.quants in
test_cuda_kernels.py), then x.float() @ w.T in fp32. Tolerance: normalized MSE
sum((y - ref)^2) / sum(ref^2) <= 1e-5 (NMSE_TOL). The kernels accumulate in fp32 in another order
and recover sum(v*x) from sum((1 + v/2^b) * x) (see the module docstring), which costs at most 8 of
fp32's 24 bits: with fp32 x the NMSE is ~1e-12. fp16/bf16 outputs add their own rounding (bf16:
<= 2^-18 = 3.8e-6 per value, under the tolerance).

Blocks are random bytes with random finite fp16 scale fields (subnormal to ~1), from
test_cuda_kernels._data. The Gluon kernels run on the GPU (marker gpu) and, when Triton is
installed and TRITON_INTERPRET=1, on the CPU through the Triton interpreter (_interpreted below).
"""
from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch

from lstream.backends.cuda import gemv as cg
from lstream.backends.cuda import dequant as ck
from lstream.core.qtypes import QTYPE_INFO, QType
from test_cuda_kernels import _data  # random GGUF blocks with random finite fp16 scales

gguf = pytest.importorskip("gguf")

NMSE_TOL = 1e-5
TYPES = sorted(cg.GEMV_TYPES)
INTERPRET = cg.HAVE_GLUON and os.environ.get("TRITON_INTERPRET") == "1"


def nmse(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float().cpu(), ref.float().cpu()
    assert torch.isfinite(y).all()
    return float(((y - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30))


def case(qt: QType, rows: int, blocks: int, batch: int, dtype=torch.float16, seed: int = 0):
    """(x, blocks uint8 (rows, row_bytes), reference y fp32); x ~ N(0, 1/K) keeps y inside fp16."""
    cols = blocks * QTYPE_INFO[qt].block_size
    a = _data(qt, rows, cols, seed=seed * 1000 + rows + int(qt))
    w = torch.from_numpy(a)
    x = (torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed)) / cols ** 0.5).to(dtype)
    ref = x.float() @ ck.dequantize(w, qt, cols, dtype=torch.float32, use_triton=False).t()
    return x, w, ref


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_reference_path_matches_gguf(qt):
    """use_kernel=False (CPU / no Triton): dequantize + matmul, against gguf.quants directly."""
    x, w, _ = case(qt, 6, 2, 3, torch.float32)
    cols = x.shape[1]
    deq = gguf.quants.dequantize(w.numpy(), gguf.GGMLQuantizationType(int(qt))).reshape(6, cols)
    ref = x.double() @ torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float64)).t()
    y = cg.gemv(x, w, qt, 6, cols, use_kernel=False)
    assert y.shape == (3, 6) and y.dtype == torch.float32
    assert nmse(y, ref) <= 1e-12


def test_bad_arguments():
    x, w, _ = case(QType.Q4_0, 4, 2, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        cg.gemv(x, w, QType.Q4_0, 4, 48)
    with pytest.raises(ValueError, match="bytes"):
        cg.gemv(x, w, QType.Q4_0, 5, 64)
    with pytest.raises(ValueError, match="x must be"):
        cg.gemv(x[:, :32], w, QType.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="supports"):
        cg.gemv(x, w, QType.Q2_K, 4, 64)


# --- the kernels under the Triton interpreter --------------------------------------------------
# The interpreter runs plain Triton only. Gluon code is Triton plus explicit layouts, so each Gluon
# function is re-created over a `gl` that forwards to triton.language and drops the layouts, and
# two interpreter quirks are patched for the test: "gl.constexpr" annotations, and int(x) of the
# 1-element arrays the interpreter keeps scalars in (numpy >= 2.4 refuses them in range(NBK)).


@pytest.fixture
def interpreted(monkeypatch):
    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as tjit

    norm = tjit._normalize_ty
    monkeypatch.setattr(tjit, "_normalize_ty",
                        lambda t: "constexpr" if isinstance(t, str) and t.strip() == "gl.constexpr" else norm(t))
    patch = interp._patch_lang_tensor

    def patch_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patch_tensor)

    class GL:  # looked up at call time: the interpreter patches tl's builtins per launch
        BlockedLayout = SliceLayout = staticmethod(lambda *a, **k: None)
        arange = staticmethod(lambda s, e, layout=None: tl.arange(s, e))
        zeros = staticmethod(lambda shape, dtype, layout=None: tl.zeros(shape, dtype))

        def __getattr__(self, name):
            return getattr(tl, name)

    done = {}

    def convert(jf):
        name = jf.fn.__name__
        if name not in done:
            glb = dict(jf.fn.__globals__, gl=GL(), tl=tl)
            fn = types.FunctionType(jf.fn.__code__, glb, name, jf.fn.__defaults__, jf.fn.__closure__)
            fn.__annotations__ = {k: tl.constexpr if "constexpr" in str(v) else v
                                  for k, v in jf.fn.__annotations__.items()}
            done[name] = triton.jit(fn)
            for k, v in jf.fn.__globals__.items():  # the helpers it calls
                if type(v).__name__ == "GluonJITFunction" and k != name:
                    glb[k] = convert(v)
        return done[name]

    for name in ("_k_q32", "_k_q45k", "_k_q6k"):
        monkeypatch.setattr(cg, name, convert(getattr(cg, name)))


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter not enabled (TRITON_INTERPRET=1 with triton)")
@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter truncates to bf16
def test_kernels_in_interpreter(qt, dtype, interpreted):
    for rows, blocks, batch in [(5, 1, 1), (7, 3, 3), (9, 8, 8), (13, 16, 2)]:
        x, w, ref = case(qt, rows, blocks, batch, dtype)
        out = torch.full((batch, rows), float("nan"), dtype=dtype)
        cg._launch(x, w.reshape(-1), qt, rows, x.shape[1], out)
        assert nmse(out, ref) <= NMSE_TOL, (rows, blocks, batch)


# --- GPU ----------------------------------------------------------------------------------------
needs_kernel = pytest.mark.skipif(not (torch.cuda.is_available() and cg.HAVE_GLUON), reason="needs CUDA + Gluon")


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("shape", [(2115, 16), (37, 1), (37, 3)], ids=lambda s: f"{s[0]}x{s[1]}blk")
def test_gpu_gemv(qt, batch, shape):
    """2115 rows: 4-row programs with a 3-row tail; 1 and 3 blocks per row: K loop of 1 block."""
    x, w, ref = case(qt, shape[0], shape[1], batch)
    out = torch.full((batch, shape[0]), float("nan"), dtype=x.dtype, device="cuda")
    y = cg.gemv(x.cuda(), w.cuda(), qt, shape[0], x.shape[1], out=out)
    assert y is out
    assert nmse(y, ref) <= NMSE_TOL


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gemv_dtypes(qt, dtype):
    x, w, ref = case(qt, 300, 8, 3, dtype, seed=1)
    y = cg.gemv(x.cuda(), w.cuda(), qt, 300, x.shape[1])
    assert y.dtype == dtype and y.shape == (3, 300)
    assert nmse(y, ref) <= NMSE_TOL


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_gpu_other_configs(qt):
    """Configs other than config()'s (the benchmark sweeps them): BN, KB, TI, warps."""
    x, w, ref = case(qt, 1000, 16, 3, seed=2)
    for cfg in [(8, 64, 2, 4), (2, 64, 4, 8), (1, 4, 8, 2), (4, 16, 16, 8), (8, 32, 2, 2)]:
        out = torch.full((3, 1000), float("nan"), dtype=x.dtype, device="cuda")
        cg._launch(x.cuda(), w.cuda().reshape(-1), qt, 1000, x.shape[1], out, cfg)
        assert nmse(out, ref) <= NMSE_TOL, cfg


@pytest.mark.gpu
@needs_kernel
def test_gpu_big_batch_is_split():
    x, w, ref = case(QType.Q4_0, 700, 4, 11)
    assert nmse(cg.gemv(x.cuda(), w.cuda(), QType.Q4_0, 700, x.shape[1]), ref) <= NMSE_TOL


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("qt", [QType.Q4_0, QType.Q6_K], ids=lambda q: q.name)
def test_gpu_cuda_graph_and_flat_view(qt):
    """A flat view at a 256-byte aligned offset of a bigger buffer; captured once, replayed on new x."""
    x, w, ref = case(qt, 1000, 8, 2)
    nbytes = w.numel()
    buf = torch.zeros(256 + nbytes + 512, dtype=torch.uint8, device="cuda")
    buf[256:256 + nbytes] = w.reshape(-1).cuda()
    flat = buf[256:256 + nbytes]
    xs = torch.zeros_like(x, device="cuda")
    out = torch.empty(x.shape[0], 1000, dtype=x.dtype, device="cuda")
    cg.gemv(xs, flat, qt, 1000, x.shape[1], out=out)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cg.gemv(xs, flat, qt, 1000, x.shape[1], out=out)
    xs.copy_(x)
    g.replay()
    torch.cuda.synchronize()
    assert nmse(out, ref) <= NMSE_TOL
