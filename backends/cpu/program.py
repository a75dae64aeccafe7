"""Decode plans compiled for the CPU backend: a run of a split's nodes becomes one numba call.

Op by op, a SmolLM2 decode token is ~450 backend calls, ~2 ms of Python on top of ~5 ms of
kernels.  Compiled once per (split, tokens, logits mode), the same nodes become an instruction
table (backends/cpu_program_kernels.py) over preallocated buffers; a run copies its inputs in,
makes one call and copies out the values later nodes read.  Decode only (<= MAX_TOKENS tokens):
larger batches go op by op, where prefill's sgemm kernels are.
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.typed import List

from ...core.executor import Fused
from ...core.ops import Op
from . import ops as O
from . import program_kernels as P
from .matmul_int import LAYOUT_ID

MAX_TOKENS = 8  # the matmul kernels quantize activations themselves up to here (decode drivers)
_EMPTY_F32 = np.zeros(1, np.float32)


def _RO(dtype):
    return types.Array(dtype, 1, "C", readonly=True)


def _typed(arrays, nbtype):
    out = List.empty_list(nbtype)
    for a in arrays:
        out.append(a)
    return out


class Program(Fused):
    """Nodes [k0, k1) of a split's assignments, run by one call.  `inputs`: ids of the values it
    reads from outside; `outputs`: ids of the values it makes that later nodes (or the caller) read."""

    def __init__(self, backend, nodes, k0: int, inputs: list[int], outputs: list[int], last_use: dict):
        self.backend, self.nodes, self.k0, self.k1 = backend, nodes, k0, k0 + len(nodes)
        self.inputs, self.outputs = inputs, outputs
        self._out_set = frozenset(outputs)
        self._last_use = last_use
        self._built = None  # compiled on the first run, when the inputs' shapes are known
        self.ids = frozenset(n.id for n in nodes)

    # -- compile -----------------------------------------------------------------------------
    def _build(self, args: list[np.ndarray], ctx):
        be = self.backend
        shapes: list[tuple[int, int]] = []  # buffer -> (rows, width)
        free: dict[tuple[int, int], list[int]] = {}
        refs: dict[int, int] = {}  # buffer -> live values in it
        val: dict[int, tuple[int, int, int]] = {}  # node id -> (buffer, c0, c1)
        rows_of: dict[int, int] = {}
        keep: set[int] = set()  # buffers of outputs: never reused

        def alloc(rows, width):
            pool = free.get((rows, width))
            b = pool.pop() if pool else None
            if b is None:
                b = len(shapes)
                shapes.append((rows, width))
            refs[b] = 0
            return b

        def bind(nid, b, c0, c1, rows, count=True):
            val[nid] = (b, c0, c1)
            rows_of[nid] = rows
            refs[b] += count

        def release(nid):
            b = val[nid][0]
            refs[b] -= 1
            if refs[b] == 0 and b not in keep:
                free.setdefault(shapes[b], []).append(b)

        in_bufs = []
        for i, a in zip(self.inputs, args):
            b = alloc(a.shape[0], a.shape[1])
            bind(i, b, 0, a.shape[1], a.shape[0])
            in_bufs.append(b)
        weights, wk, vecs, kvs, ropes, quant = [], [], [], [], {}, {}
        vec_ix: dict[str, int] = {}
        stacked: dict[tuple, int] = {}  # (stack id, input id) -> buffer
        code, fpar = [], []

        def vec(name):
            if name not in vec_ix:
                vec_ix[name] = len(vecs)
                vecs.append(be._vector(name))
            return vec_ix[name]

        def emit(op, out, a, b=None, c=None, ps=(), f=0.0):
            row = [op, *out, *a, *(b or (0, 0, 0)), *(c or (0, 0, 0)), *ps]
            code.append(row + [0] * (P.N_COLS - len(row)))
            fpar.append(f)

        def whole(nid):
            """nid's value as a whole buffer (NORM's input, attention's q): copied out of a stack."""
            b, c0, c1 = val[nid]
            if c0 == 0 and c1 == shapes[b][1]:
                return val[nid]
            w = alloc(rows_of[nid], c1 - c0)
            emit(P.OP_COPY, (w, 0, c1 - c0), val[nid])
            bind(-2 - len(code), w, 0, c1 - c0, rows_of[nid])  # a temporary: never released
            return (w, 0, c1 - c0)

        def width(nid):
            b, c0, c1 = val[nid]
            return c1 - c0

        for node in self.nodes:
            op, p, x = node.op, node.params, node.inputs
            rows = rows_of[x[0]]
            if op is Op.MATMUL:
                name = node.weights[0]
                grp = be._groups.get(name)
                key = (id(grp[0]), x[0]) if grp is not None else None
                if grp is not None and (key in stacked or self._stackable(grp, x[0])):
                    if key not in stacked:  # the first sibling computes all of them
                        w = grp[0]
                        b = alloc(rows, w.n_rows)
                        refs[b] = len(grp[3])  # held until every sibling's value is dead
                        self._emit_mm(emit, weights, wk, quant, w, whole(x[0]), b, rows)
                        stacked[key] = b
                    bind(node.id, stacked[key], grp[1].start, grp[1].stop, rows, count=False)
                else:
                    w = be._weight(name)
                    b = alloc(rows, w.n_rows)
                    self._emit_mm(emit, weights, wk, quant, w, whole(x[0]), b, rows)
                    bind(node.id, b, 0, w.n_rows, rows)
                if len(node.weights) > 1:
                    emit(P.OP_BIAS, val[node.id], val[node.id], ps=(vec(node.weights[1]),))
            else:
                if op is Op.RMS_NORM and p.get("select_output") and ctx.logits == "last":
                    rows = 1
                n = width(x[0])
                if op is Op.ROPE:
                    n = p["n_head"] * p["head_dim"]
                b = alloc(rows, n)
                out = (b, 0, n)
                if op is Op.RMS_NORM:
                    emit(P.OP_NORM, out, whole(x[0]), ps=(vec(node.weights[0]), int(rows != rows_of[x[0]])),
                         f=p["eps"])
                elif op is Op.RMS_NORM_HEADS:
                    emit(P.OP_NORM_HEADS, out, val[x[0]], ps=(vec(node.weights[0]), p["head_dim"]), f=p["eps"])
                elif op is Op.ADD:
                    emit(P.OP_ADD, out, val[x[0]], val[x[1]])
                elif op is Op.SWIGLU or op is Op.GEGLU:
                    emit(P.OP_ACT, out, val[x[0]], val[x[1]], ps=(O.ACT_SILU if op is Op.SWIGLU else O.ACT_GELU,))
                elif op is Op.SCALE:
                    emit(P.OP_SCALE, out, val[x[0]], f=p["value"])
                elif op is Op.ROPE:
                    key = (p["base"], p["n_rot"], id(p["scaling"]))
                    if key not in ropes:
                        ropes[key] = (len(ropes), p)
                    emit(P.OP_ROPE, out, val[x[0]], ps=(ropes[key][0], p["n_head"], p["head_dim"], p["n_rot"],
                                                         int(p["mode"] == "neox")))
                elif op is Op.ATTENTION:
                    kv = ctx.kv.layers[node.layer]
                    kvs.append(kv)
                    emit(P.OP_ATTN, out, whole(x[0]), val[x[1]], val[x[2]],
                         ps=(len(kvs) - 1, p["n_head"], p["n_head_kv"], p["head_dim"], int(p.get("window", 0) or 0)),
                         f=p["scale"])
                else:  # pragma: no cover - supports() admits only the ops above
                    raise NotImplementedError(op)
                bind(node.id, b, 0, n, rows)
            if node.id in self._out_set:
                keep.add(val[node.id][0])
            for i in dict.fromkeys(x):
                if i in val and self._last_use.get(i) == node.id:
                    release(i)

        n_tok = len(ctx.tokens)
        bufs = [np.zeros(s, np.float32) for s in shapes]
        half = max([p["n_rot"] // 2 for _, p in ropes.values()], default=1)
        cos = np.zeros((max(1, len(ropes)), n_tok, half), np.float32)
        sin = np.zeros_like(cos)
        f32_2, f32_3 = types.float32[:, ::1], types.float32[:, :, ::1]
        qkeys = sorted(quant, key=quant.get)
        self._built = dict(
            code=np.array(code, np.int64).reshape(-1, P.N_COLS), fpar=np.array(fpar, np.float32).reshape(-1, 1),
            bufs=_typed(bufs, f32_2),
            wk=np.array(wk, np.int64).reshape(-1, 4) if wk else np.zeros((1, 4), np.int64),
            # read-only types: a weight may be the file's memory map itself (Q8_0 blocks in place)
            wq=_typed([w[0] for w in weights], _RO(types.uint8)), wh=_typed([w[1] for w in weights], _RO(types.uint32)),
            wd=_typed([w[2] for w in weights], _RO(types.float32)), wm=_typed([w[3] for w in weights], _RO(types.float32)),
            vec=_typed(vecs or [_EMPTY_F32], _RO(types.float32)),
            kc=_typed([kv.k for kv in kvs] or [np.zeros((1, 1, 1), np.float32)], f32_3),
            vc=_typed([kv.v for kv in kvs] or [np.zeros((1, 1, 1), np.float32)], f32_3),
            cos=cos, sin=sin, ropes=[p for _, p in sorted(ropes.values(), key=lambda r: r[0])],
            xq=_typed([np.zeros(k, np.int16) for k in qkeys], types.int16[:, ::1]),
            xd=_typed([np.zeros((k[0], k[1] // 32), np.float32) for k in qkeys], f32_2),
            xs=_typed([np.zeros((k[0], k[1] // 32), np.float32) for k in qkeys], f32_2),
            in_bufs=[bufs[b] for b in in_bufs],
            out_views=[bufs[val[i][0]][:, val[i][1]:val[i][2]] for i in self.outputs],
            kv=ctx.kv)

    @staticmethod
    def _emit_mm(emit, weights, wk, quant, w, x, b, rows) -> None:
        a = w.kernel_args()
        wk.append(a[0])
        weights.append(a[1:])
        qk = quant.setdefault((rows, w.n_cols), len(quant))
        emit(P.OP_MM, (b, 0, w.n_rows), x, ps=(len(weights) - 1, qk))

    def _stackable(self, grp, x_id) -> bool:
        """All siblings of a stacked weight are in this program and read the same input."""
        names = set(grp[3])
        sib = [n for n in self.nodes if n.op is Op.MATMUL and n.weights[0] in names]
        return len(sib) == len(names) and all(n.inputs[0] == x_id for n in sib)

    # -- run ---------------------------------------------------------------------------------
    def run(self, args: list[np.ndarray], ctx) -> list[np.ndarray]:
        bt = self._built
        if bt is None or bt["kv"] is not ctx.kv:
            self._build(args, ctx)
            bt = self._built
        for buf, a in zip(bt["in_bufs"], args):
            np.copyto(buf, a)
        for k, p in enumerate(bt["ropes"]):
            cos, sin = self.backend._cos_sin(ctx, p)
            bt["cos"][k, :, :cos.shape[1]] = cos
            bt["sin"][k, :, :sin.shape[1]] = sin
        P.run(bt["code"], bt["fpar"], bt["bufs"], bt["wk"], bt["wq"], bt["wh"], bt["wd"], bt["wm"], bt["vec"],
              bt["kc"], bt["vc"], bt["cos"], bt["sin"], ctx.n_past, bt["xq"], bt["xd"], bt["xs"])
        return [v.copy() for v in bt["out_views"]]


def supports(backend, node, ctx) -> bool:
    """Can a program run this node (else it runs op by op)?"""
    op = node.op
    if op is Op.MATMUL:
        w = backend._weight(node.weights[0])
        return w.layout in LAYOUT_ID
    if op is Op.ATTENTION:
        kv = ctx.kv.layers[node.layer]
        k = getattr(kv, "k", None)
        return isinstance(k, np.ndarray) and k.dtype == np.float32 and k.flags.c_contiguous \
            and kv.v.flags.c_contiguous
    return op in (Op.RMS_NORM, Op.RMS_NORM_HEADS, Op.ADD, Op.SWIGLU, Op.GEGLU, Op.SCALE, Op.ROPE)


def compile_split(backend, assignments, last_use: dict, ctx) -> list:
    """The split's assignments as items: a Node runs op by op, a Program runs a run of nodes.
    Profiled runs get one program per layer, so the profile still has a time for each layer."""
    by_layer = ctx.profile is not None
    nodes = [a.node for a in assignments]
    ok = [supports(backend, n, ctx) for n in nodes]
    items: list = []
    k = 0
    while k < len(nodes):
        if not ok[k]:
            items.append(nodes[k])
            k += 1
            continue
        j = k
        while j < len(nodes) and ok[j] and not (by_layer and nodes[j].layer != nodes[k].layer):
            j += 1
        run = nodes[k:j]
        if len(run) < 2:
            items.extend(run)
        else:
            ids = {n.id for n in run}
            inputs = list(dict.fromkeys(i for n in run for i in n.inputs if i not in ids))
            outputs = [n.id for n in run if last_use.get(n.id, n.id) not in ids or last_use.get(n.id) == n.id]
            items.append(Program(backend, run, k, inputs, outputs, last_use))
        k = j
    return items
