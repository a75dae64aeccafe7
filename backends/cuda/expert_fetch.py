"""Routed experts fetched into a device slot by a kernel that reads the pinned expert arena itself
(zero-copy: pinned memory is mapped into the device's address space), for the device share of a
host-expert decode step replayed as one graph (hop_share.py).

Why a kernel and not the copy engine: a DMA's source address is fixed when it is enqueued, so the
host had to route each hop, then enqueue one copy per expert and a flag (~60 us of host work a layer
on the H200's host, measured, before it could start its own experts); the kernel takes the expert
ids from the device's router, so the whole share stays inside the graph and the host only computes.
"""
from __future__ import annotations

import torch

from .moe_kernels import HAVE_TRITON, _launch

WORD = 4  # bytes a lane moves: int32 words, four to a 16-byte load where the offsets allow
CHUNK = 4096  # words a program moves (16 KiB: ~650 programs for 4 Qwen3-30B-A3B experts)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _k_fetch(src, ids, dst, base, pitch, eb, n_max, first, CH: tl.constexpr):
        """Program (i, r, c): chunk c of tensor r (gate, up, down: `pitch` words apart from `base`) of
        expert ids[first + i], `eb` words an expert, into slot row r, expert i (rows n_max * eb apart)."""
        i, r, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        e = tl.load(ids + first + i).to(tl.int64)
        off = c * CH + tl.arange(0, CH)
        m = off < eb
        v = tl.load(src + (base + r.to(tl.int64) * pitch + e * eb) + off, mask=m)
        tl.store(dst + (r * n_max + i).to(tl.int64) * eb + off, v, mask=m)


def usable(arena: torch.Tensor, slot: torch.Tensor, base: int, pitch: int, eb: int) -> bool:
    """The kernel runs here (a CUDA slot, Triton) and every offset is whole 16-byte units (its loads)."""
    return (HAVE_TRITON and slot.is_cuda and arena.is_pinned() and not (base | pitch | eb) % 16
            and arena.data_ptr() % 16 == 0 and slot.data_ptr() % 16 == 0)


def fetch(arena: torch.Tensor, ids: torch.Tensor, first: int, n: int, slot: torch.Tensor, base: int,
          pitch: int, eb: int) -> None:
    """Slot (3, n_max, eb) bytes <- experts ids[0, first:first + n] of the arena's tensors at byte
    `base` (gate), base + pitch, base + 2 * pitch, eb bytes an expert; enqueued, no host sync."""
    w = WORD
    _launch(_k_fetch, (n, 3, triton.cdiv(eb // w, CHUNK)), arena.view(torch.int32), ids.contiguous(),
            slot.view(torch.int32), base // w, pitch // w, eb // w, slot.shape[1], first, CH=CHUNK, num_warps=4)
