"""The MOE op on the CPU: route (core/moe.py), then the selected experts' SwiGLU FFNs, weighted and
summed per token. Decode (up to SMALL_BATCH tokens, quantized experts): every (token, expert) pair
through the grouped matvec kernels (moe_kernels.py), one parallel call for gate+up, one for down.
Larger batches: tokens grouped by expert, each expert's rows through matmul() (int16 kernels or
dequantized tiles + sgemm, as any weight). Float experts (safetensors) take the grouped path."""
from __future__ import annotations

import numpy as np

from ...core.batch import is_small_batch
from ...core.moe import expert_counts, group, route
from ...core.residency import TensorEntry
from . import matmul_int
from . import moe_kernels as K
from . import ops as O
from .matmul import matmul
from .weights import PackedWeight, pack, row_view


# An expert with fewer of a batch's tokens than this runs its pairs through the grouped decode kernels
# (its weights read once per token) instead of a per-expert product (~0.1 ms of Python and launches
# each): in a prompt whose experts the device uploads, the CPU gets these (by default < 4 tokens).
RARE_TOKENS = 4


class Experts:
    """One 3-D expert tensor packed for the kernels: `whole` (every expert's rows back to back, one
    weight: the grouped kernels' input) when the data is one array of blocks, and `per[e]`."""

    def __init__(self, e: TensorEntry, blk_types, act8: bool = False):
        self.n_expert, self.rows, self.cols = e.shape
        self.whole: PackedWeight | None = None
        if isinstance(e.data, np.ndarray):  # GGUF (or quantized at load): one array
            self.whole = pack(e.qtype, e.data, e.n_rows, e.n_cols, blk_types)
            self.whole.act8 = act8  # (before the views: they copy it)
            self.per = [row_view(self.whole, x * self.rows, (x + 1) * self.rows) for x in range(self.n_expert)]
        else:  # safetensors: each expert's matrix where it lies in the file
            self.per = [pack(e.qtype, e.expert(x), self.rows, self.cols, blk_types) for x in range(self.n_expert)]
            for w in self.per:
                w.act8 = act8

    @property
    def grouped(self) -> bool:
        return self.whole is not None and self.whole.layout in matmul_int.LAYOUT_ID


def experts_of(backend, name: str) -> Experts:
    ex = backend._experts.get(name)
    if ex is None:
        e = backend.residency[name]
        if not e.n_expert:
            raise ValueError(f"{name}: not an expert tensor")
        ex = backend._experts[name] = Experts(e, backend.blk_types, backend.act8)
    return ex


def compute(backend, node, inputs, ctx) -> np.ndarray:
    """inputs: x (T, n_embd), router logits (T, n_expert)[, shared expert's output]."""
    p = node.params
    x = np.ascontiguousarray(inputs[0], dtype=np.float32)
    ids, w = route(inputs[1], p["top_k"], p["norm"])
    out = experts_ffn(backend, node, x, ids, w)
    if len(inputs) > 2:  # Qwen2-MoE: + sigmoid(x . w_gate) * shared expert
        g = x @ backend.vector(node.weights[3])
        out += (1.0 / (1.0 + np.exp(-g)))[:, None].astype(np.float32) * np.asarray(inputs[2], np.float32)
    return out


def decode(backend, node, x: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """A decode step's MoE op without a shared expert: routed by the numba router (core/moe.route's
    result), then experts_ffn (the fast path between two replayed device segments, --cpu-moe)."""
    ids, w = route_small(node, logits)
    return experts_ffn(backend, node, x, ids, w)


def route_small(node, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """core/moe.route for a few tokens by the numba router: (ids (T, top_k) int32, weights float32)."""
    p = node.params
    T, k = len(logits), p["top_k"]
    ids, w = np.empty((T, k), np.int32), np.empty((T, k), np.float32)
    K.route(np.ascontiguousarray(logits, dtype=np.float32), k, bool(p["norm"]), ids, w)
    return ids, w


def experts_ffn(backend, node, x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_j w[t, j] * FFN_ids[t, j](x[t]) for every token t; pairs with ids < 0 are skipped (the
    experts a device computes itself)."""
    gate, up, down = (experts_of(backend, n) for n in node.weights[:3])
    x = np.ascontiguousarray(x, dtype=np.float32)
    # (gate and up share x's scales in the grouped kernel: both int8 or both int16 activations)
    grouped = gate.grouped and up.grouped and down.grouped and gate.whole.int8_act == up.whole.int8_act
    if grouped and is_small_batch(x.shape[0]):
        return _pairs(gate, up, down, x, ids, w)
    if grouped:  # an expert with few of the batch's tokens: its pairs by the grouped kernels too
        counts = expert_counts(ids, gate.n_expert)
        rare = (ids >= 0) & (counts[np.maximum(ids, 0)] < RARE_TOKENS)
        if rare.any():
            rows = np.nonzero(rare.any(axis=1))[0]
            out = np.zeros(x.shape, np.float32)
            out[rows] = _pairs(gate, up, down, x[rows], np.where(rare[rows], ids[rows], -1), w[rows])
            rest = np.where(rare, -1, ids)
            if (rest >= 0).any():
                out += _by_expert(backend, gate, up, down, x, rest, w)
            return out
    return _by_expert(backend, gate, up, down, x, ids, w)


def _pairs(gate: Experts, up: Experts, down: Experts, x, ids, w) -> np.ndarray:
    k = ids.shape[1]
    flat = np.nonzero(ids.reshape(-1) >= 0)[0]
    out = np.zeros(x.shape, np.float32)
    if len(flat) == 0:
        return out
    # one numba call: quantization inside, two parallel launches (gate|up with SwiGLU, down)
    K.pairs_ffn(*gate.whole.kernel_args(), *up.whole.kernel_args(), *down.whole.kernel_args(), x,
                (flat // k).astype(np.int64), ids.reshape(-1)[flat].astype(np.int64),
                w.reshape(-1)[flat].astype(np.float32), gate.rows, out)
    return out


def _by_expert(backend, gate: Experts, up: Experts, down: Experts, x, ids, w) -> np.ndarray:
    k = ids.shape[1]
    groups = group(ids, gate.n_expert)
    wflat = w.reshape(-1)
    out = np.zeros(x.shape, np.float32)
    use_blas, gmin = backend.blas, backend.gemm_min_tokens
    for j, e in enumerate(groups.experts):
        pairs = groups.pairs[groups.starts[j]:groups.starts[j + 1]]
        tok = pairs // k
        xe = np.ascontiguousarray(x[tok])
        g = matmul(gate.per[e], xe, None, use_blas, gmin)
        u = matmul(up.per[e], xe, None, use_blas, gmin)
        h = O.swiglu(g, u)
        y = matmul(down.per[e], np.ascontiguousarray(h, dtype=np.float32), None, use_blas, gmin)
        out[tok] += y * wflat[pairs][:, None]  # a token meets an expert at most once
    return out
