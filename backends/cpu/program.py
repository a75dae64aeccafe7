"""Decode steps compiled for the CPU backend (splits of up to SMALL_BATCH tokens, Options.cpu_programs):
a run of a split's nodes becomes an instruction table that program_kernels.run executes in one call."""
from __future__ import annotations

import numpy as np

from ...core.executor import Fused
from ...core.ops import Op
from . import ops as O
from . import ffn_share, host_kv
from . import program_kernels as P
from .matmul_int import LAYOUT_ID

# Op by op, a SmolLM2 decode token is ~450 backend calls, ~2 ms of Python on top of ~5 ms of
# kernels.  Compiled once per (split, tokens, logits mode), the same nodes become an instruction
# table (program_kernels.py) over preallocated buffers; a run copies its inputs in, makes one call
# and copies out the values later nodes read.

F32 = np.float32
# P.run's paged-attention arguments (SeqBatch's slots, seq, positions, tables, block size) for a
# single sequence: unused, typed as the real ones so both share one compilation
_NO_BATCH = (np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros(1, np.int64), np.zeros((1, 1), np.int32), 1)
_NO_HALF = np.zeros((1, 1, 8), np.uint16)  # the mirror table's row of a layer that reads float32


def _table(arrays, ndim: int, dtype) -> np.ndarray:
    """The arrays as program_kernels.run takes them: one row [address, shape...] each (kept alive by
    the built program).  Plain int64 arrays, so run loads from numba's disk cache."""
    tab = np.zeros((len(arrays), 1 + ndim), np.int64)
    for i, a in enumerate(arrays):
        # the kernel sees raw memory: anything else would be read wrongly, not rejected
        if a.ndim != ndim or a.dtype != dtype or not a.flags.c_contiguous:
            raise TypeError(f"program array {a.dtype} {a.shape} {a.strides}: want C-contiguous {ndim}-D {dtype}")
        tab[i, 0] = a.ctypes.data
        tab[i, 1:] = a.shape
    return tab


class _Assembler:
    """One program being compiled: each value a column range (buffer, c0, c1) of a 2-D float32 buffer,
    buffers reused once every value in them is dead (outputs' buffers never), one table row per
    instruction."""

    def __init__(self, backend, program):
        self.be, self.prog = backend, program
        self.shapes: list[tuple[int, int]] = []  # buffer -> (rows, width)
        self.free: dict[tuple[int, int], list[int]] = {}
        self.refs: dict[int, int] = {}  # buffer -> live values in it
        self.val: dict[int, tuple[int, int, int]] = {}  # node id -> (buffer, c0, c1)
        self.rows_of: dict[int, int] = {}
        self.keep: set[int] = set()  # buffers of outputs: never reused
        self.weights, self.wk, self.vecs, self.kvs = [], [], [], []
        self.ropes: dict[tuple, tuple] = {}  # rope key -> (index, params)
        self.quant: dict[tuple[int, int], int] = {}  # (rows, n_cols) -> activation buffers index
        self.vec_ix: dict[str, int] = {}
        self.stacked: dict[tuple, int] = {}  # (stack id, input id) -> buffer
        self.code, self.fpar = [], []
        self.hooks: list[tuple] = []  # (before instruction k, "start" | "finish", layer, value)

    def alloc(self, rows, width) -> int:
        pool = self.free.get((rows, width))
        b = pool.pop() if pool else None
        if b is None:
            b = len(self.shapes)
            self.shapes.append((rows, width))
        self.refs[b] = 0
        return b

    def bind(self, nid, b, c0, c1, rows, count=True) -> None:
        self.val[nid] = (b, c0, c1)
        self.rows_of[nid] = rows
        self.refs[b] += count

    def release(self, nid) -> None:
        b = self.val[nid][0]
        self.refs[b] -= 1
        if self.refs[b] == 0 and b not in self.keep:
            self.free.setdefault(self.shapes[b], []).append(b)

    def vec(self, name) -> int:
        if name not in self.vec_ix:
            self.vec_ix[name] = len(self.vecs)
            self.vecs.append(self.be.vector(name))
        return self.vec_ix[name]

    def emit(self, op, out, a, b=None, c=None, ps=(), f=0.0) -> None:
        row = [op, *out, *a, *(b or (0, 0, 0)), *(c or (0, 0, 0)), *ps]
        self.code.append(row + [0] * (P.N_COLS - len(row)))
        self.fpar.append(f)

    def whole(self, nid):
        """nid's value as a whole buffer (NORM's input, attention's q): copied out of a stack."""
        b, c0, c1 = self.val[nid]
        if c0 == 0 and c1 == self.shapes[b][1]:
            return self.val[nid]
        w = self.alloc(self.rows_of[nid], c1 - c0)
        self.emit(P.OP_COPY, (w, 0, c1 - c0), self.val[nid])
        self.bind(-2 - len(self.code), w, 0, c1 - c0, self.rows_of[nid])  # a temporary: never released
        return (w, 0, c1 - c0)

    def matmul(self, node, rows) -> None:
        x = node.inputs[0]
        name = node.weights[0]
        shared = self.prog.shared.get(name)
        if shared is not None:
            return self._shared_mm(node, rows, *shared)
        st = self.be.stack_of(name)
        key = (id(st.weight), x) if st is not None else None
        if st is not None and (key in self.stacked or self.prog.stackable(st, x)):
            if key not in self.stacked:  # the first sibling computes all of them
                b = self.alloc(rows, st.weight.n_rows)
                self.refs[b] = len(st.names)  # held until every sibling's value is dead
                self._mm(st.weight, self.whole(x), b, rows)
                self.stacked[key] = b
            self.bind(node.id, self.stacked[key], st.cols.start, st.cols.stop, rows, count=False)
        else:
            w = self.be.weight(name)
            b = self.alloc(rows, w.n_rows)
            self._mm(w, self.whole(x), b, rows)
            self.bind(node.id, b, 0, w.n_rows, rows)
        if len(node.weights) > 1:
            self.emit(P.OP_BIAS, self.val[node.id], self.val[node.id], ps=(self.vec(node.weights[1]),))

    def _shared_mm(self, node, rows, layer, r, kind) -> None:
        """An FFN matmul whose last columns the device computes (backends/cuda/ffn_share.py): the
        device starts on the input before gate (a hook), the CPU's partial down product gets the
        device's added after down (another): the program runs in pieces between them."""
        x = self.whole(node.inputs[0])
        if kind == "gate":
            self.hooks.append((len(self.code), "start", layer, x))
        w = ffn_share.cpu_weight(self.be, node.weights[0], r)
        b = self.alloc(rows, w.n_rows)
        self._mm(w, x, b, rows)
        self.bind(node.id, b, 0, w.n_rows, rows)
        if kind == "down":
            self.hooks.append((len(self.code), "finish", layer, (b, 0, w.n_rows)))

    def _mm(self, w, x, b, rows) -> None:
        a = w.kernel_args()
        self.wk.append(a[0])
        self.weights.append(a[1:])
        qk = self.quant.setdefault((rows, w.n_cols), len(self.quant))
        self.emit(P.OP_MM, (b, 0, w.n_rows), x, ps=(len(self.weights) - 1, qk))

    def op(self, node, rows, ctx) -> None:
        """Every op but MATMUL: its output gets a buffer of its own."""
        op, p, x, val = node.op, node.params, node.inputs, self.val
        if op is Op.RMS_NORM and p.get("select_output") and ctx.logits == "last":
            rows = 1
        b0, c0, c1 = val[x[0]]
        n = p["n_head"] * p["head_dim"] if op is Op.ROPE else c1 - c0
        out = (self.alloc(rows, n), 0, n)
        if op is Op.RMS_NORM:
            self.emit(P.OP_NORM, out, self.whole(x[0]),
                      ps=(self.vec(node.weights[0]), int(rows != self.rows_of[x[0]])), f=p["eps"])
        elif op is Op.RMS_NORM_HEADS:
            self.emit(P.OP_NORM_HEADS, out, val[x[0]], ps=(self.vec(node.weights[0]), p["head_dim"]), f=p["eps"])
        elif op is Op.ADD:
            self.emit(P.OP_ADD, out, val[x[0]], val[x[1]])
        elif op is Op.SWIGLU or op is Op.GEGLU:
            self.emit(P.OP_ACT, out, val[x[0]], val[x[1]], ps=(O.ACT_SILU if op is Op.SWIGLU else O.ACT_GELU,))
        elif op is Op.SCALE:
            self.emit(P.OP_SCALE, out, val[x[0]], f=p["value"])
        elif op is Op.ROPE:
            key = (p["base"], p["n_rot"], id(p["scaling"]))
            if key not in self.ropes:
                self.ropes[key] = (len(self.ropes), p)
            self.emit(P.OP_ROPE, out, val[x[0]], ps=(self.ropes[key][0], p["n_head"], p["head_dim"], p["n_rot"],
                                                     int(p["mode"] == "neox")))
        elif op is Op.ATTENTION:
            self.kvs.append(ctx.kv.layers[node.layer])
            self.emit(P.OP_PATTN if ctx.batch is not None else P.OP_ATTN, out, self.whole(x[0]), val[x[1]], val[x[2]],
                      ps=(len(self.kvs) - 1, p["n_head"], p["n_head_kv"], p["head_dim"], int(p.get("window", 0) or 0)),
                      f=p["scale"])
        else:  # pragma: no cover - supports() admits only the ops above
            raise NotImplementedError(op)
        self.bind(node.id, out[0], 0, n, rows)

    def finish(self, ctx, in_bufs: list[int], outputs: list[int]) -> dict:
        """The arrays program_kernels.run takes, and what Program.run copies in and out."""
        n_tok = len(ctx.tokens)
        bufs = [np.zeros(s, np.float32) for s in self.shapes]
        half = max([p["n_rot"] // 2 for _, p in self.ropes.values()], default=1)
        cos = np.zeros((max(1, len(self.ropes)), n_tok, half), np.float32)
        qkeys = sorted(self.quant, key=self.quant.get)
        ws = self.weights
        xq = [np.zeros(k, np.int16) for k in qkeys]
        xd = [np.zeros((k[0], k[1] // 32), np.float32) for k in qkeys]
        xs = [np.zeros((k[0], k[1] // 32), np.float32) for k in qkeys]
        kc, vc = [kv.k for kv in self.kvs], [kv.v for kv in self.kvs]
        # float16 mirrors decode reads when deep (host_kv.py); a layer without one: a row count of -1
        half = [kv.half(ctx.n_past) for kv in self.kvs]
        kh = [kv.kh if h else _NO_HALF for kv, h in zip(self.kvs, half)]
        vh = [kv.vh if h else _NO_HALF for kv, h in zip(self.kvs, half)]
        nh = [kv.n_half if h else np.full(1, -1, np.int64) for kv, h in zip(self.kvs, half)]
        return dict(
            code=np.array(self.code, np.int64).reshape(-1, P.N_COLS),
            fpar=np.array(self.fpar, np.float32).reshape(-1, 1), bufs=_table(bufs, 2, F32),
            wk=np.array(self.wk, np.int64).reshape(-1, 4) if self.wk else np.zeros((1, 4), np.int64),
            # a weight may be the file's memory map itself (Q8_0 blocks in place): the kernels only read it
            wq=_table([w[0] for w in ws], 1, np.uint8), wh=_table([w[1] for w in ws], 1, np.uint32),
            wd=_table([w[2] for w in ws], 1, np.uint8), wm=_table([w[3] for w in ws], 1, np.uint8),  # scales as bytes
            vec=_table(self.vecs, 1, F32), kc=_table(kc, 3, F32), vc=_table(vc, 3, F32),
            kh=_table(kh, 3, np.uint16), vh=_table(vh, 3, np.uint16), nh=_table(nh, 1, np.int64),
            cos=cos, sin=np.zeros_like(cos), ropes=[p for _, p in sorted(self.ropes.values(), key=lambda r: r[0])],
            xq=_table(xq, 2, np.int16), xd=_table(xd, 2, F32), xs=_table(xs, 2, F32),
            # the arrays behind the tables' addresses: alive as long as the program
            alive=(bufs, list(ws), list(self.vecs), kc, vc, kh, vh, nh, xq, xd, xs),
            in_bufs=[bufs[b] for b in in_bufs],
            hooks=[(k, what, layer, bufs[v[0]][:, v[1]:v[2]]) for k, what, layer, v in self.hooks],
            out_views=[bufs[self.val[i][0]][:, self.val[i][1]:self.val[i][2]] for i in outputs],
            kv=ctx.kv, deep=ctx.n_past >= host_kv.HALF_FROM)


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
        self.shared = ffn_share.shared_layers(backend, nodes)  # FFN weights the device takes part of
        self.share = backend.share

    # -- compile -----------------------------------------------------------------------------
    def _build(self, args: list[np.ndarray], ctx):
        asm = _Assembler(self.backend, self)
        in_bufs = []
        for i, a in zip(self.inputs, args):
            b = asm.alloc(a.shape[0], a.shape[1])
            asm.bind(i, b, 0, a.shape[1], a.shape[0])
            in_bufs.append(b)
        for node in self.nodes:
            rows = asm.rows_of[node.inputs[0]]
            if node.op is Op.MATMUL:
                asm.matmul(node, rows)
            else:
                asm.op(node, rows, ctx)
            if node.id in self._out_set:
                asm.keep.add(asm.val[node.id][0])
            for i in dict.fromkeys(node.inputs):
                if i in asm.val and self._last_use.get(i) == node.id:
                    asm.release(i)
        self._built = asm.finish(ctx, in_bufs, self.outputs)

    def stackable(self, stack, x_id) -> bool:
        """All siblings of a stacked weight are in this program and read the same input."""
        names = set(stack.names)
        sib = [n for n in self.nodes if n.op is Op.MATMUL and n.weights[0] in names]
        return len(sib) == len(names) and all(n.inputs[0] == x_id for n in sib)

    # -- run ---------------------------------------------------------------------------------
    def run(self, args: list[np.ndarray], ctx) -> list[np.ndarray]:
        bt = self._built
        if self.share is not self.backend.share:  # the device's FFN share changed: build again
            self.shared, self.share, bt = ffn_share.shared_layers(self.backend, self.nodes), self.backend.share, None
        if bt is None or bt["kv"] is not ctx.kv or (not bt["deep"] and ctx.n_past >= host_kv.HALF_FROM):
            # (deep the first time: built again with the layers' float16 mirrors)
            self._build(args, ctx)
            bt = self._built
        for buf, a in zip(bt["in_bufs"], args):
            np.copyto(buf, a)
        for k, p in enumerate(bt["ropes"]):
            cos, sin = self.backend.cos_sin(ctx, p)
            bt["cos"][k, :, :cos.shape[1]] = cos
            bt["sin"][k, :, :sin.shape[1]] = sin
        b = ctx.batch
        paged = (b.slots, b.seq, np.asarray(ctx.positions, np.int64), b.tables, b.block_size) if b is not None \
            else _NO_BATCH
        rest = (bt["bufs"], bt["wk"], bt["wq"], bt["wh"], bt["wd"], bt["wm"], bt["vec"], bt["kc"], bt["vc"], bt["kh"],
                bt["vh"], bt["nh"], host_kv.HALF_FROM, bt["cos"], bt["sin"], ctx.n_past, bt["xq"], bt["xd"], bt["xs"],
                *paged)
        code, fpar, k0 = bt["code"], bt["fpar"], 0
        for k, what, layer, v in bt["hooks"]:  # the device's part of shared FFNs, between pieces
            if k > k0:
                P.run(code[k0:k], fpar[k0:k], *rest)
            getattr(self.share, what)(layer, v)
            k0 = k
        if k0 < len(code):
            P.run(code[k0:], fpar[k0:], *rest)
        return [v.copy() for v in bt["out_views"]]


def supports(backend, node, ctx) -> bool:
    """Can a program run this node (else it runs op by op)?"""
    op = node.op
    if op is Op.MATMUL:
        w = backend.weight(node.weights[0])
        return w.layout in LAYOUT_ID
    if ctx.batch is not None and node.params.get("select_output"):
        return False  # several sequences: the logits rows op by op (backend.py)
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
