"""A model as a list of nodes in topological order; built once per architecture."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .ops import Op

INPUT = -1  # node id standing for the batch's token ids

# Projections of one layer that read the same input: a backend may stack them into one weight and
# compute them with one matmul (q|k|v; gate|up). Tensor kinds, as in blk.N.<kind>.weight.
STACKED_PROJECTIONS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


@dataclass
class Node:
    id: int
    op: Op
    name: str
    inputs: tuple[int, ...]
    layer: int  # -1: input layer (embedding), 0..n_layer-1: blocks, n_layer: output layer
    weights: tuple[str, ...] = ()  # canonical tensor names, weight first then bias
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def weight(self) -> str | None:
        return self.weights[0] if self.weights else None


class Graph:
    def __init__(self, n_layer: int):
        self.n_layer = n_layer
        self.nodes: list[Node] = []
        self.output: int = INPUT

    def add(self, op: Op, name: str, inputs: tuple[int, ...], layer: int,
            weights: tuple[str | None, ...] = (), **params) -> int:
        for i in inputs:
            if i != INPUT and not 0 <= i < len(self.nodes):
                raise ValueError(f"node {name}: input {i} is not an earlier node")
        node = Node(len(self.nodes), op, name, tuple(inputs), layer,
                    tuple(w for w in weights if w is not None), params)
        self.nodes.append(node)
        return node.id

    def consumers(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if i != INPUT:
                    out[i].append(n.id)
        return out

    def last_use(self) -> dict[int, int]:
        """For each node, the id of the last node reading it (the output lives to the end)."""
        last = {n.id: n.id for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if i != INPUT:
                    last[i] = n.id
        last[self.output] = len(self.nodes)
        return last

    def without_output(self) -> "Graph":
        """The graph up to the last block: what a ubatch whose logits nobody reads needs to run."""
        n_body = sum(1 for n in self.nodes if n.layer < self.n_layer)
        if any(n.layer >= self.n_layer for n in self.nodes[:n_body]):
            raise ValueError("output-layer nodes must come after every block")
        g = Graph(self.n_layer)
        g.nodes = self.nodes[:n_body]
        g.output = n_body - 1
        return g

    def weight_names(self) -> set[str]:
        return {w for n in self.nodes for w in n.weights}

    def __len__(self) -> int:
        return len(self.nodes)
