"""Weight formats: ggml's type ids, block sizes and bytes per block, as one table."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class QType(enum.IntEnum):
    # Values are ggml's type ids, so GGUF headers map straight onto this enum.
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    BF16 = 30


@dataclass(frozen=True)
class QInfo:
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


QTYPE_INFO: dict[QType, QInfo] = {
    QType.F32: QInfo(1, 4),
    QType.F16: QInfo(1, 2),
    QType.BF16: QInfo(1, 2),
    QType.Q4_0: QInfo(32, 18),
    QType.Q4_1: QInfo(32, 20),
    QType.Q5_0: QInfo(32, 22),
    QType.Q5_1: QInfo(32, 24),
    QType.Q8_0: QInfo(32, 34),
    QType.Q8_1: QInfo(32, 36),
    QType.Q2_K: QInfo(256, 84),
    QType.Q3_K: QInfo(256, 110),
    QType.Q4_K: QInfo(256, 144),
    QType.Q5_K: QInfo(256, 176),
    QType.Q6_K: QInfo(256, 210),
    QType.Q8_K: QInfo(256, 292),
}

FLOAT_TYPES = frozenset({QType.F32, QType.F16, QType.BF16})


def row_bytes(qtype: QType, n_cols: int) -> int:
    """Bytes of one row of n_cols weights; n_cols must be a whole number of blocks."""
    info = QTYPE_INFO[qtype]
    if n_cols % info.block_size:
        raise ValueError(f"{qtype.name} rows need a multiple of {info.block_size} values, found {n_cols}")
    return n_cols // info.block_size * info.type_size


def tensor_bytes(qtype: QType, shape: tuple[int, ...]) -> int:
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return n_rows * row_bytes(qtype, shape[-1])
