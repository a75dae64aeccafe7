"""Resident 32-weight-block weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) in an aligned layout for the GPU.

A GGUF block is 18-34 bytes and only 2-byte aligned, so a kernel reading blocks in place loads
them 2 bytes at a time and spends its issue slots on loads. Resident weights are uploaded once, so
they are split once on the device into per-row arrays: the quant bytes of each block back to back
(16 or 32 bytes: whole 16-byte vector loads), the fp16 scales (and mins) and the 32 fifth bits of
the 5-bit types. Same bytes in all, nothing else kept; streamed weights stay in GGUF blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.qtypes import QType

# type -> (block bytes, offset of m or -1, offset of qh or -1, offset of the quants, quant bytes)
LAYOUT = {
    QType.Q4_0: (18, -1, -1, 2, 16),
    QType.Q4_1: (20, 2, -1, 4, 16),
    QType.Q5_0: (22, -1, 2, 6, 16),
    QType.Q5_1: (24, 2, 4, 8, 16),
    QType.Q8_0: (34, -1, -1, 2, 32),
}
TYPES = frozenset(LAYOUT)


@dataclass
class Packed:
    qtype: QType
    n_rows: int
    n_cols: int
    qs: torch.Tensor  # (n_rows, n_blocks * quant bytes / 4) int32: block quants back to back
    d: torch.Tensor  # (n_rows, n_blocks) fp16 scales
    m: torch.Tensor | None  # (n_rows, n_blocks) fp16 mins (Q4_1, Q5_1)
    qh: torch.Tensor | None  # (n_rows, n_blocks) int32 fifth bits (Q5_0, Q5_1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    def rows(self, r0: int, r1: int) -> "Packed":
        """Rows [r0, r1) as views (a stacked q|k|v or gate|up's single weights)."""
        cut = lambda t: None if t is None else t[r0:r1]  # noqa: E731
        return Packed(self.qtype, r1 - r0, self.n_cols, self.qs[r0:r1], self.d[r0:r1], cut(self.m), cut(self.qh))


def _field(b: torch.Tensor, off: int, n: int) -> torch.Tensor:
    return b[:, off:off + n].contiguous()


def repack(raw: torch.Tensor, qtype: QType, n_rows: int, n_cols: int) -> Packed:
    """raw: GGUF blocks of an (n_rows, n_cols) weight on the device, (n_rows, row_bytes) or flat."""
    ts, m_off, qh_off, qs_off, qb = LAYOUT[qtype]
    nb = n_cols // 32
    b = raw.reshape(n_rows * nb, ts)
    qs = _field(b, qs_off, qb).view(n_rows, nb * qb).view(torch.int32)
    d = _field(b, 0, 2).view(torch.float16).view(n_rows, nb)
    m = _field(b, m_off, 2).view(torch.float16).view(n_rows, nb) if m_off >= 0 else None
    qh = _field(b, qh_off, 4).view(torch.int32).view(n_rows, nb) if qh_off >= 0 else None
    return Packed(qtype, n_rows, n_cols, qs, d, m, qh)


def concat(ps: list[Packed]) -> Packed:
    cat = lambda f: None if getattr(ps[0], f) is None else torch.cat([getattr(p, f) for p in ps])  # noqa: E731
    return Packed(ps[0].qtype, sum(p.n_rows for p in ps), ps[0].n_cols, cat("qs"), cat("d"), cat("m"), cat("qh"))


def to_blocks(p: Packed) -> torch.Tensor:
    """The GGUF blocks again, (n_rows, row_bytes) uint8 (for the paths that read blocks)."""
    ts, m_off, qh_off, qs_off, qb = LAYOUT[p.qtype]
    nb = p.n_cols // 32
    out = torch.empty((p.n_rows * nb, ts), dtype=torch.uint8, device=p.qs.device)
    out[:, 0:2] = p.d.reshape(-1, 1).view(torch.uint8)
    if p.m is not None:
        out[:, m_off:m_off + 2] = p.m.reshape(-1, 1).view(torch.uint8)
    if p.qh is not None:
        out[:, qh_off:qh_off + 4] = p.qh.reshape(-1, 1).view(torch.uint8)
    out[:, qs_off:qs_off + qb] = p.qs.reshape(-1).view(torch.uint8).view(-1, qb)
    return out.view(p.n_rows, nb * ts)
