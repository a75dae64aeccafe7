"""The launch shapes of the int8 expert GEMVs (backends/cuda/moe_q8.py), from the weight's shape only (a
decode step is captured once): every thread owns whole blocks, a warp's threads cover the blocks of a
step and the rest of it the rows, and a step's blocks divide a row's (no K mask). The kernel itself runs
on a GPU only (Gluon): tests/test_moe_kernels.py's GPU tests check it against gguf."""
from __future__ import annotations

import pytest

from lstream.backends.cuda import moe_q8


@pytest.mark.parametrize("n,cols,pairs", [(768, 2048, 8), (2048, 768, 8), (768, 2048, 64), (14336, 4096, 2),
                                          (96, 224, 3), (224, 96, 3), (1408, 4096, 8), (4096, 1408, 8)])
def test_config_fills_warps_with_whole_blocks(n, cols, pairs):
    bn, kb, tk, nw = moe_q8.config(n, cols, pairs)
    nb = cols // 32
    assert nb % kb == 0 and kb & (kb - 1) == 0  # whole steps, power-of-two aranges
    assert tk * nw == kb and 32 % tk == 0  # one block per thread along the step
    assert bn % (32 // tk) == 0  # the other threads of a warp on distinct rows, none idle
    assert nw in (1, 2) and (bn <= 8 or bn == 32 // tk)  # (more rows only where a warp has that many)


def test_config_spreads_small_steps_over_more_programs():
    """A one-token step of Qwen3-30B-A3B's experts: gate|up (768 rows of 2048) halves its rows per program
    to reach ~8 programs per SM of an H200; the down projection (2048 rows of 768: 24 blocks) puts 8
    threads on a step's blocks and 4 on rows."""
    assert moe_q8.config(768, 2048, 8) == (4, 64, 32, 2)
    assert moe_q8.config(2048, 768, 8) == (8, 8, 8, 1)
    assert moe_q8.config(768, 2048, 64)[0] == 8  # eight tokens: programs enough at 8 rows


def test_not_used_off_the_gpu():
    import torch
    from lstream.backends.cuda.repack import repack
    from lstream.core.qtypes import QType
    p = repack(torch.zeros((4, 18 * 2), dtype=torch.uint8), QType.Q4_0, 4, 64)
    assert not moe_q8.usable(torch.zeros(1, 64), p)
