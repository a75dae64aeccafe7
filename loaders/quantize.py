"""Quantize on load: float weights (F32/F16/BF16, e.g. a safetensors checkpoint) become GGUF
blocks in host memory, with ggml's exact block layout and rounding (bit-exact against
gguf.quants.quantize), so the CPU kernels and the streamer use them as they use GGUF blocks.

  Q8_0 block (34 bytes): d f16 = amax/127, then 32 int8 q = roundf(x/d)
  Q4_0 block (18 bytes): d f16 = max/-8 (max: the signed value of largest magnitude), then 16
                         bytes of nibbles q = min(15, trunc(x/d + 8.5)): byte j = q[j] | q[j+16] << 4
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..core.qtypes import QType, tensor_bytes
from ..core.residency import State, TensorEntry

QUANTIZE_TYPES = {"q8_0": QType.Q8_0, "q4_0": QType.Q4_0}
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
_CHUNK = 1 << 20  # float values quantized per step (bounds the temporaries to a few MiB)


def to_float32(qtype: QType, data) -> np.ndarray:
    """A float tensor's data (F32/F16 arrays, BF16 as raw bytes or uint16) as float32 of the same rows."""
    a = np.asarray(data)
    if qtype == QType.F32:
        return a.astype(np.float32, copy=False)
    if qtype == QType.F16:
        return a.astype(np.float32)
    if qtype == QType.BF16:
        u = a.view(np.uint16) if a.dtype != np.uint16 else a
        return (u.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"expected a float tensor (F32, F16 or BF16), found {QType(qtype).name}")


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero), as ggml and gguf.quants round."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + np.floor(2 * (a - f)))


def q8_0_blocks(x: np.ndarray) -> np.ndarray:
    """x (n_blocks, 32) float32 -> (n_blocks, 34) uint8."""
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _roundf(x * inv).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


def q4_0_blocks(x: np.ndarray) -> np.ndarray:
    """x (n_blocks, 32) float32 -> (n_blocks, 18) uint8."""
    imax = np.abs(x).argmax(axis=1)[:, None]
    d = np.take_along_axis(x, imax, axis=1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc(x * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    packed = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)


_BLOCKS = {QType.Q8_0: q8_0_blocks, QType.Q4_0: q4_0_blocks}


def quantize_rows(qtype: QType, src_qtype: QType, data, n_rows: int, n_cols: int) -> np.ndarray:
    """A float matrix (rows of n_cols values) -> (n_rows, row_bytes) uint8 GGUF blocks."""
    qtype = QType(qtype)
    if n_cols % 32:
        raise ValueError(f"rows of {n_cols} values are not a multiple of the {qtype.name} block (32)")
    fn = _BLOCKS[qtype]
    row_bytes = tensor_bytes(qtype, (n_cols,))
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    src = np.asarray(data).reshape(n_rows, -1)
    step = max(1, _CHUNK // n_cols)
    for r0 in range(0, n_rows, step):
        x = to_float32(src_qtype, src[r0:r0 + step]).reshape(-1, 32)
        out[r0:r0 + step] = fn(x).reshape(-1, row_bytes)
    return out


@dataclass
class QuantizeReport:
    qtype: QType
    n_tensors: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"quantized {self.n_tensors} tensors to {self.qtype.name} in {self.seconds:.1f} s: "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")


def target_type(name: str, qtype: QType) -> QType:
    """llama.cpp keeps the output head at higher precision (Q6_K) for 4-bit types; with no K-quant
    quantizer here it gets Q8_0 (a tied head is the embedding)."""
    if qtype == QType.Q4_0 and name in ("output.weight", "token_embd.weight"):
        return QType.Q8_0
    return qtype


def quantize_model(model, qtype: str | QType) -> QuantizeReport:
    """Quantize every float 2-D weight of a LoadedModel in place (norms and biases stay float);
    tensors already quantized (GGUF blocks) are left as they are. Entries become State.HOST."""
    if isinstance(qtype, str):
        if qtype.lower() not in QUANTIZE_TYPES:
            raise ValueError(f"unsupported quantize type {qtype!r}: expected one of {', '.join(QUANTIZE_TYPES)}")
        qtype = QUANTIZE_TYPES[qtype.lower()]
    rmap = model.residency
    tied = {e.alias_of for e in rmap if e.alias_of}
    rep = QuantizeReport(QType(qtype))
    t0 = time.perf_counter()
    for e in list(rmap):
        if e.alias_of is not None or len(e.shape) not in (2, 3) or e.qtype not in FLOAT_TYPES or e.n_cols % 32:
            continue
        want = target_type("output.weight" if e.name in tied else e.name, qtype)
        if e.n_expert:  # experts, one by one, into one (n_expert, rows, row bytes) array of blocks
            data = np.stack([quantize_rows(want, e.qtype, e.expert(x), e.shape[1], e.n_cols)
                             for x in range(e.n_expert)])
        else:
            data = quantize_rows(want, e.qtype, e.data, e.n_rows, e.n_cols)
        rep.n_tensors += 1
        rep.bytes_before += e.nbytes
        e.qtype, e.data, e.nbytes, e.state = want, data, data.nbytes, State.HOST
        rep.bytes_after += e.nbytes
    for e in rmap:  # a tied head follows the embedding it shares
        if e.alias_of is not None:
            src: TensorEntry = rmap[e.alias_of]
            e.qtype, e.data, e.nbytes, e.state = src.qtype, src.data, src.nbytes, src.state
    rep.seconds = time.perf_counter() - t0
    model.metadata["lstream.quantized"] = rep.line()
    return rep
