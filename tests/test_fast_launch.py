"""Direct relaunch of compiled kernels (backends/cuda/fast_launch.py) gives the results of Triton's own
launch path: same shape twice (the second call is a direct launch) on new data, and a view at an
unaligned offset (a different specialization, so a different cache entry). GPU only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _blocks(n_rows, n_cols, seed):
    from gguf import GGMLQuantizationType, quants
    w = np.random.default_rng(seed).standard_normal((n_rows, n_cols)).astype(np.float32)
    return torch.from_numpy(quants.quantize(w, GGMLQuantizationType.Q4_0)).cuda()


def test_gemv_relaunch_matches_reference():
    from lstream.backends.cuda import gemv as cg
    from lstream.core.qtypes import QType
    n_rows, n_cols = 1000, 4096
    for seed in range(3):
        blocks = _blocks(n_rows, n_cols, seed)
        x = torch.randn(1, n_cols, device="cuda", dtype=torch.float16)
        ref = cg.gemv(x, blocks, QType.Q4_0, n_rows, n_cols, use_kernel=False)
        got = cg.gemv(x, blocks, QType.Q4_0, n_rows, n_cols)
        nmse = float(((got.float() - ref.float()) ** 2).sum() / (ref.float() ** 2).sum())
        assert nmse < 1e-5, (seed, nmse)
        # 2-byte offset into a bigger buffer: the alignment specialization differs
        buf = torch.zeros(blocks.numel() + 2, dtype=torch.uint8, device="cuda")
        buf[2:] = blocks.reshape(-1)
        got2 = cg.gemv(x, buf[2:], QType.Q4_0, n_rows, n_cols)
        assert torch.equal(got, got2)
    assert all(f.enabled for f in cg._fast) and any(f.cache for f in cg._fast)


def test_rms_norm_relaunch():
    from lstream.backends.cuda import norm_rope as ck
    w = torch.rand(4096, device="cuda")
    for _ in range(3):
        x = torch.randn(5, 4096, device="cuda")
        got = ck.rms_norm(x, w, 1e-5, torch.float32)
        ref = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * w
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
