"""Decode steps' nodes fused into single launches on the CUDA backend (Backend.compile_split):

  ADD + the RMS_NORM that reads it           -> decode_kernels.add_rms_norm (residual and norm)
  ROPE(q) + ROPE(k) + ATTENTION(q', k', v)   -> rope_store + split-K attention over the cache (one
                                                token: RoPE and the K/V write inside the attention)
  MATMUL(gate) + MATMUL(up) + SWIGLU         -> one int8 GEMV over gate|up, SwiGLU in its epilogue
                                                (opt-in, LSTREAM_GLU=1: not faster yet)

A unit takes the fast path in a static step (core/replay.py: positions on the device) of a layer
whose K/V live here; anywhere else it runs its nodes one by one through compute(), so fusion
never changes what a plan computes, only how many kernels it launches.
"""
from __future__ import annotations

import os

from ...core.batch import is_small_batch
from ...core.executor import Fused
from ...core.ops import Op
from . import decode_kernels as dk
from . import gemv_q8
from .attention import DeviceKV
from .repack import Packed


class _Unit(Fused):
    def __init__(self, backend, nodes, k0: int, inputs: list[int], outputs: list[int]):
        self.be, self.nodes, self.k0, self.k1 = backend, nodes, k0, k0 + len(nodes)
        self.inputs, self.outputs = inputs, outputs
        self.ids = frozenset(n.id for n in nodes)

    def run(self, args, ctx):
        if ctx.graph is not None:
            out = self.fast(args, ctx)
            if out is not None:
                return out
        vals = dict(zip(self.inputs, args))
        for n in self.nodes:
            vals[n.id] = self.be.compute(n, [vals[i] for i in n.inputs], ctx)
        return [vals[i] for i in self.outputs]

    def fast(self, args, ctx):
        raise NotImplementedError


class AddNorm(_Unit):
    def fast(self, args, ctx):
        x, h = args
        add, norm = self.nodes
        if x.dim() != 2 or h.shape != x.shape or x.dtype.is_floating_point is False or h.stride(-1) != 1:
            return None
        s, y = dk.add_rms_norm(x.float().contiguous(), h, self.be._small[norm.weights[0]], norm.params["eps"],
                               self.be.dtype, self.be.use_triton)
        if norm.params.get("select_output") and ctx.logits == "last":
            y = y[-1:]
        return [s, y]


class RopeAttention(_Unit):
    def fast(self, args, ctx):
        q, k, v = args
        rq, rk, att = self.nodes
        store = self.be.kv_store(ctx, att.layer)
        if not isinstance(store, DeviceKV) or min(t.stride(-1) for t in (q, k, v)) != 1:
            return None
        p, pa = rq.params, att.params
        cos, sin = self.be.static_cos_sin(p, ctx)
        out = dk.rope_attention(q, k, v, cos, sin, ctx.graph.positions, store.k, store.v, pa["scale"],
                                pa.get("window", 0) or 0, pa["n_head"], pa["n_head_kv"], pa["head_dim"], p["n_rot"],
                                p["mode"] == "neox", self.be.dtype, self.be.use_triton)
        if out is not None:  # one token: RoPE and the cache write inside the attention's launch
            return [out]
        qo = dk.rope_store(q, k, v, cos, sin, ctx.graph.positions, store.k, store.v, pa["n_head"], pa["n_head_kv"],
                           pa["head_dim"], p["n_rot"], p["mode"] == "neox", self.be.use_triton)
        return [dk.attention(qo, store.k, store.v, ctx.graph.positions, pa["scale"], pa.get("window", 0) or 0,
                             pa["n_head"], pa["n_head_kv"], self.be.dtype, use_triton=self.be.use_triton)]


class GateUpAct(_Unit):
    """The FFN's gate and up GEMVs and SwiGLU: one launch of the int8 GEMV over the stacked gate|up
    weight with the activation in its epilogue (backends/cuda/gemv_q8.gemv_glu). Opt-in
    (LSTREAM_GLU=1): on the H200, with the fused attention combine, resident decode measured 385.6
    t/s against 406.5 without both (tools/gpu_notes.md); which of the two loses is not known yet."""

    def fast(self, args, ctx):
        gate, up, _ = self.nodes
        stack = self.be._stacks.get(gate.weights[0])
        if stack is None or len(gate.weights) > 1 or len(up.weights) > 1 or os.environ.get("LSTREAM_GLU") != "1":
            return None
        big, rows, names = stack
        if not isinstance(big, Packed) or names != [gate.weights[0], up.weights[0]] or rows.start != 0:
            return None
        y = gemv_q8.gemv_glu(args[0], big, rows.stop, self.be.dtype)
        if y is not None:
            self.be._after(gate, ctx)
            self.be._after(up, ctx)
        return None if y is None else [y]


def compile_split(backend, assignments, last_use: dict, ctx) -> list | None:
    """A decode-sized split's nodes with the fusable runs as units, or None when there are none."""
    if not is_small_batch(len(ctx.tokens)):
        return None
    nodes = [a.node for a in assignments]
    units, k, found = [], 0, False
    while k < len(nodes):
        n = nodes[k]
        nxt = nodes[k + 1] if k + 1 < len(nodes) else None
        nx2 = nodes[k + 2] if k + 2 < len(nodes) else None
        if n.op is Op.ADD and nxt is not None and nxt.op is Op.RMS_NORM and nxt.inputs == (n.id,):
            units.append(AddNorm(backend, [n, nxt], k, list(n.inputs), [n.id, nxt.id]))
            k, found = k + 2, True
        elif (n.op is Op.ROPE and nxt is not None and nxt.op is Op.ROPE and nx2 is not None
              and nx2.op is Op.ATTENTION and nx2.inputs[:2] == (n.id, nxt.id)):
            units.append(RopeAttention(backend, [n, nxt, nx2], k, [n.inputs[0], nxt.inputs[0], nx2.inputs[2]],
                                       [nx2.id]))
            k, found = k + 3, True
        elif (n.op is Op.MATMUL and nxt is not None and nxt.op is Op.MATMUL and nx2 is not None
              and nx2.op is Op.SWIGLU and nx2.inputs == (n.id, nxt.id) and n.inputs == nxt.inputs
              and last_use.get(n.id) == nx2.id and last_use.get(nxt.id) == nx2.id):
            units.append(GateUpAct(backend, [n, nxt, nx2], k, list(n.inputs), [nx2.id]))
            k, found = k + 3, True
        else:
            units.append(n)
            k += 1
    return units if found else None
