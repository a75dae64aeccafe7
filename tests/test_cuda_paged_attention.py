"""The CUDA backend's paged attention (backends/cuda/attention_paged.py) against its torch reference
and against decode_kernels' contiguous attention, on a GPU (marker gpu) and, with triton installed
and TRITON_INTERPRET=1, on the CPU through the Triton interpreter (as tests/test_cuda_decode_kernels.py).
Tolerance: normalized MSE 1e-4 (q.k and p.v in bf16 on tensor cores on a GPU)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lstream.backends.cuda import attention_paged as ap
from lstream.backends.cuda import decode_kernels as dk

INTERPRET = dk.HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] + [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton interpreter not enabled"))]


def _nmse(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def _case(dev, g, bs, seed=5):
    """Three sequences of lengths 70, 9 and 33 (+ their new tokens: a 3-token chunk, one decode token
    each) in shuffled blocks of bs slots; returns what paged_attention takes and each token's
    contiguous (positions, keys, values) for the reference."""
    gen = torch.Generator().manual_seed(seed)
    n_kv, hd = 2, 64
    n_head = n_kv * g
    n_blocks = 64
    perm = torch.randperm(n_blocks, generator=gen)
    kc = torch.randn(n_blocks * bs, n_kv, hd, generator=gen).to(torch.bfloat16)
    vc = torch.randn(n_blocks * bs, n_kv, hd, generator=gen).to(torch.bfloat16)
    lens, news = [70, 9, 33], [3, 1, 1]
    tables, nxt = [], 0
    for n in lens:
        need = -(-(n + 3) // bs)
        tables.append(perm[nxt:nxt + need].tolist())
        nxt += need
    width = max(len(t) for t in tables)
    tab = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        tab[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    seq = torch.tensor(sum(([i] * c for i, c in enumerate(news)), []), dtype=torch.int32)
    pos = torch.tensor(sum((list(range(n, n + c)) for n, c in zip(lens, news)), []), dtype=torch.int64)
    qo = torch.randn(len(pos), n_head, hd, generator=gen) * 2
    return dict(qo=qo.to(dev), kc=kc.to(dev), vc=vc.to(dev), tab=tab.to(dev), seq=seq.to(dev), pos=pos.to(dev),
                n_head=n_head, n_kv=n_kv, hd=hd, bs=bs)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("g,bs,window", [(4, 16, 0), (1, 32, 0), (2, 16, 20), (3, 8, 0)])
def test_paged_attention(dev, g, bs, window):
    c = _case(dev, g, bs)
    out = ap.paged_attention(c["qo"], c["kc"], c["vc"], c["tab"], c["seq"], c["pos"], bs, c["hd"] ** -0.5, window,
                             c["n_head"], c["n_kv"], torch.float32)
    ref = ap.paged_attention_reference(c["qo"].cpu().double(), c["kc"].cpu().double(), c["vc"].cpu().double(),
                                       c["tab"].cpu(), c["seq"].cpu(), c["pos"].cpu(), bs, c["hd"] ** -0.5, window,
                                       c["n_kv"])
    assert out.shape == (len(c["pos"]), c["n_head"] * c["hd"])
    assert _nmse(out, ref) < 1e-4


def test_reference_matches_contiguous_attention():
    """The paged reference reads through the table what the contiguous reference reads in place."""
    c = _case("cpu", 2, 16)
    bs = c["bs"]
    for i in range(len(c["pos"])):
        row, p = int(c["seq"][i]), int(c["pos"][i])
        ps = torch.arange(p + 1)
        slots = c["tab"][row].long()[ps // bs] * bs + ps % bs
        kc, vc = c["kc"][slots], c["vc"][slots]
        want = dk.attention_reference(c["qo"][i:i + 1], kc, vc, torch.tensor([p]), 0.125, 0, c["n_kv"])
        got = ap.paged_attention_reference(c["qo"][i:i + 1], c["kc"], c["vc"], c["tab"], c["seq"][i:i + 1],
                                           c["pos"][i:i + 1], bs, 0.125, 0, c["n_kv"])
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_batch_tensors_once_per_ubatch():
    from lstream.core.paged_kv import SeqBatch

    class Be:
        name, device = "cuda", torch.device("cpu")
    b = SeqBatch(np.array([0, 0, 1], np.int32), np.array([5, 6, 40], np.int64), np.array([[0, 1], [2, 0]], np.int32),
                 16, np.array([1, 2]))
    t1 = ap.batch_tensors(Be(), b, np.array([3, 4, 8]))
    assert ap.batch_tensors(Be(), b, np.array([3, 4, 8])) is t1
    assert t1["rows"].tolist() == [1, 2] and t1["slots"].dtype == torch.int64
