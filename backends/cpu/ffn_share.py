"""The CPU's part of a decode FFN shared with the device (backends/cuda/ffn_share.py): the first r
columns of the FFN, as weights its compiled programs (program.py) read."""
from __future__ import annotations

import numpy as np

from ...core.qtypes import QTYPE_INFO
from .weights import PackedWeight, pack, row_view

KINDS = ("gate", "up", "down")


def cpu_weight(backend, name: str, r: int) -> PackedWeight:
    """Rows [:r] of gate/up (a view of the packed weight), columns [:r] of down (packed anew from
    the GGUF blocks of those columns, kept per r)."""
    w = backend.share_w.get((name, r))
    if w is None:
        e = backend.residency[name]
        if ".ffn_down." in name:
            info = QTYPE_INFO[e.qtype]
            raw = np.asarray(e.data).view(np.uint8).reshape(e.n_rows, -1)[:, :r // info.block_size * info.type_size]
            w = pack(e.qtype, np.ascontiguousarray(raw), e.n_rows, r, backend.blk_types)
            w.act8 = backend.act8
        else:
            w = row_view(backend.weight(name), 0, r)
        backend.share_w[(name, r)] = w
    return w


def shared_layers(backend, nodes) -> dict[str, tuple[int, int, str]]:
    """weight name -> (layer, r, kind) for the FFN matmuls of `nodes` the device shares: the layer's
    gate, up and down all among them, gate and up reading one input, down reading their gate."""
    share = backend.share
    if share is None:
        return {}
    mm = {n.weights[0]: n for n in nodes if n.op.name == "MATMUL"}
    by_id = {n.id: n for n in nodes}
    out = {}
    for layer in {n.layer for n in nodes}:
        r = share.cols(layer)
        names = [f"blk.{layer}.ffn_{k}.weight" for k in KINDS]
        if r is None or not all(n in mm for n in names):
            continue
        g, u, d = (mm[n] for n in names)
        act = by_id.get(d.inputs[0])
        if (g.inputs[0] != u.inputs[0] or act is None or tuple(act.inputs) != (g.id, u.id)
                or any(len(n.weights) > 1 for n in (g, u, d))):
            continue
        out.update({n: (layer, r, k) for n, k in zip(names, KINDS)})
    return out
