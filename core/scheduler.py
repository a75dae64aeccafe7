"""Assign every node of a graph to a backend and cut the result into splits.

Pure: reads the graph, the residency map and the backends' answers; allocates nothing.
Passes, after ggml_backend_sched_split_graph:
  1. a node that reads a weight goes where the weight lives, unless a higher-priority backend
     that supports it wants to offload it (it then uploads the weight);
     attention goes where its layer's K/V cache lives, with the same offload question;
  2. other nodes follow the backend of their first input, if it supports them;
  3. anything left goes to the first backend in priority order that supports it (CPU is last
     and supports every op);
  4. consecutive nodes on one backend form a split; inputs made elsewhere are copied in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .graph import INPUT, Graph, Node
from .ops import Op
from .residency import ResidencyMap


@dataclass
class Assignment:
    node: Node
    backend: str
    cause: str
    uploads: tuple[str, ...] = ()  # weights that must travel to `backend` for this node


@dataclass
class Split:
    backend: str
    assignments: list[Assignment] = field(default_factory=list)
    copy_inputs: list[int] = field(default_factory=list)  # node ids produced by another split's backend

    @property
    def layers(self) -> list[int]:
        return sorted({a.node.layer for a in self.assignments})


@dataclass
class Plan:
    n_tokens: int
    splits: list[Split]
    backend_of: dict[int, str]  # node id -> backend name
    upload_bytes: int

    def assignments(self):
        for s in self.splits:
            yield from s.assignments

    def uploads(self) -> list[tuple[str, str]]:
        """(tensor, target backend) in execution order, each once."""
        seen, out = set(), []
        for a in self.assignments():
            for w in a.uploads:
                if (w, a.backend) not in seen:
                    seen.add((w, a.backend))
                    out.append((w, a.backend))
        return out

    def signature(self) -> tuple:
        """Equal signatures mean equal placement: plans can be cached by it."""
        return tuple((a.node.id, a.backend) for a in self.assignments())


def _data_home(node: Node, residency: ResidencyMap) -> str | None:
    if node.weight is not None:
        return residency[node.weight].home
    if node.op is Op.ATTENTION:
        return residency.layer_home(node.layer)
    return None


def schedule(graph: Graph, residency: ResidencyMap, backends: list, n_tokens: int) -> Plan:
    """backends: in priority order (device first), the CPU last."""
    by_name = {b.name: b for b in backends}
    rank = {b.name: k for k, b in enumerate(backends)}
    backend_of: dict[int, str] = {}
    assignments: dict[int, Assignment] = {}

    def supporting(node: Node):
        return [b for b in backends if b.supports_op(node)]

    # Pass 1: nodes tied to data (a weight or a K/V cache).
    for node in graph.nodes:
        home = _data_home(node, residency)
        if home is None:
            continue
        chosen, cause, uploads = None, "", ()
        for b in backends:
            if b.name == home:
                break  # only higher-priority backends may pull a node away from its data
            if not b.supports_op(node):
                continue
            want, why = b.offload_op(node, n_tokens, residency)
            if want:
                chosen, cause, uploads = b.name, f"offload: {why}", node.weights
                break
        if chosen is None:
            if home in by_name and by_name[home].supports_op(node):
                chosen, cause = home, f"data on {home}"
            else:
                cands = supporting(node)
                if not cands:
                    raise RuntimeError(f"no backend supports {node.op.value} ({node.name})")
                chosen, cause, uploads = cands[0].name, f"{home} lacks {node.op.value}", node.weights
        assignments[node.id] = Assignment(node, chosen, cause, tuple(uploads) if chosen != home else ())
        backend_of[node.id] = chosen

    # Passes 2 and 3: the rest follow their inputs, else the first backend that can.
    for node in graph.nodes:
        if node.id in backend_of:
            continue
        chosen = cause = None
        # among the inputs' backends, the highest-priority one first (ggml's pass 2 spreads device
        # assignments to neighbours): add(x on cpu, h on gpu) runs on the gpu, not a hop each way
        for i in sorted((i for i in node.inputs if i != INPUT), key=lambda i: rank[backend_of[i]]):
            if by_name[backend_of[i]].supports_op(node):
                chosen, cause = backend_of[i], f"follows {graph.nodes[i].name}"
                break
        if chosen is None:
            cands = supporting(node)
            if not cands:
                raise RuntimeError(f"no backend supports {node.op.value} ({node.name})")
            chosen, cause = cands[0].name, "first backend that supports it"
        assignments[node.id] = Assignment(node, chosen, cause)
        backend_of[node.id] = chosen

    # Pass 4: splits.
    splits: list[Split] = []
    for node in graph.nodes:
        a = assignments[node.id]
        if not splits or splits[-1].backend != a.backend:
            splits.append(Split(a.backend))
        split = splits[-1]
        split.assignments.append(a)
        for i in node.inputs:
            if i != INPUT and backend_of[i] != a.backend and i not in split.copy_inputs:
                split.copy_inputs.append(i)

    upload_bytes = 0
    seen = set()
    for a in assignments.values():
        for w in a.uploads:
            if w not in seen:
                seen.add(w)
                upload_bytes += residency[w].nbytes
    return Plan(n_tokens, splits, backend_of, upload_bytes)
