"""The one residency map: every tensor of a model, where it lives and in what state.

Loaders fill it (GGUF and safetensors alike); only the residency policy (`assign`) and the
streamer change homes and states.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from .qtypes import QType

HOST = "cpu"  # backend name of host memory


class State(enum.Enum):
    MAPPED = "mapped"  # memory-mapped from the file, zero-copy
    HOST = "host"  # in host RAM (converted or quantized at load)
    PINNED = "pinned"  # page-locked host copy, ready to stream
    RESIDENT = "resident"  # lives on a device backend


@dataclass
class TensorEntry:
    name: str  # canonical name (GGUF scheme: blk.N.attn_q.weight)
    layer: int  # -1 input (embedding), 0..n-1 blocks, n output
    shape: tuple[int, ...]  # row-major: (rows, cols) for matrices; rows of cols values
    qtype: QType
    nbytes: int
    data: Any  # host array: uint8 blocks (rows, row_bytes) or a float array; a zero-copy view
    home: str = HOST
    state: State = State.MAPPED
    source: str = ""  # file it came from
    alias_of: str | None = None  # tied output head shares the embedding's bytes

    @property
    def n_rows(self) -> int:
        """Rows of n_cols values (a 3-D expert tensor: every expert's rows, expert after expert)."""
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    # -- experts: a 3-D tensor (n_expert, rows, cols) holds one matrix per expert ----------------
    @property
    def n_expert(self) -> int:
        """Experts in this tensor (0: not an expert tensor)."""
        return self.shape[0] if len(self.shape) == 3 else 0

    @property
    def expert_nbytes(self) -> int:
        return self.nbytes // self.n_expert

    def expert(self, e: int):
        """Expert e's matrix: a zero-copy (rows, row bytes or cols) view. `data` is a 3-D array (GGUF)
        or a sequence of per-expert arrays (safetensors keeps each expert's tensor where it lies)."""
        return self.data[e]


@dataclass(frozen=True)
class ExpertUnit:
    """One expert of one layer: its gate, up and down matrices, what moves and is placed as one."""
    layer: int
    expert: int
    names: tuple[str, ...]  # the layer's 3-D expert tensors (canonical names)
    nbytes: int  # this expert's bytes in all of them
    home: str


EXPERT_KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def moe_overrides(n_cpu_moe: int) -> list[tuple[str, str]]:
    """llama.cpp's --n-cpu-moe N as -ot patterns: the experts of the first N layers stay in host
    memory (--cpu-moe: every layer's)."""
    return [(rf"^blk\.{il}\.ffn_(up|down|gate)_exps", HOST) for il in range(max(n_cpu_moe, 0))]


class ResidencyMap:
    def __init__(self, n_layer: int):
        self.n_layer = n_layer
        self.entries: dict[str, TensorEntry] = {}

    def add(self, entry: TensorEntry) -> None:
        if entry.name in self.entries:
            raise ValueError(f"duplicate tensor {entry.name}")
        self.entries[entry.name] = entry

    def __getitem__(self, name: str) -> TensorEntry:
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries.values())

    def layer(self, layer: int) -> list[TensorEntry]:
        return [e for e in self.entries.values() if e.layer == layer]

    def experts(self, layer: int) -> list[ExpertUnit]:
        """The experts of a MoE layer as units (none for a dense layer)."""
        es = [e for e in self.layer(layer) if e.n_expert]
        if not es:
            return []
        kinds = {k: i for i, k in enumerate(EXPERT_KINDS)}
        es.sort(key=lambda e: kinds.get(e.name.split(".")[2], len(kinds)))  # gate, up, down
        return [ExpertUnit(layer, x, tuple(e.name for e in es), sum(e.expert_nbytes for e in es), es[0].home)
                for x in range(es[0].n_expert)]

    def layer_home(self, layer: int) -> str:
        """Where a layer's K/V cache and activations belong: the home of its weights (experts aside:
        the layer computes where its attention is, its experts may live elsewhere, --cpu-moe)."""
        homes = {e.home for e in self.layer(layer) if e.alias_of is None and not e.n_expert} or {HOST}
        return HOST if HOST in homes and len(homes) > 1 else homes.pop()

    def layer_name(self, layer: int) -> str:
        return "input" if layer < 0 else ("output" if layer == self.n_layer else str(layer))

    def total_bytes(self, home: str | None = None) -> int:
        # A tied head is counted once, unless it lives apart from the embedding it shares.
        return sum(e.nbytes for e in self.entries.values()
                   if (e.alias_of is None or e.home != self.entries[e.alias_of].home)
                   and (home is None or e.home == home))

    def assign(self, n_gpu_layers: int, device: str, overrides: list[tuple[str, str]] = (),
               budget_bytes: int | None = None) -> list[str]:
        """Set homes the way llama.cpp's -ngl does, then apply -ot overrides and a byte budget.

        The last n_gpu_layers repeating layers go to `device`; the output layer counts as one
        more (-ngl n_layer+1 or more puts everything but the embedding there). Returns notes.
        """
        n = self.n_layer
        gpu_start = max(n - n_gpu_layers, 0)
        notes: list[str] = []
        for e in self.entries.values():
            on_gpu = (0 <= e.layer < n and e.layer >= gpu_start) or (e.layer == n and n_gpu_layers > n)
            e.home = device if on_gpu else HOST
        for pattern, dev in overrides:
            rx = re.compile(pattern)
            for e in self.entries.values():
                if rx.search(e.name):
                    e.home = HOST if dev.lower() in ("cpu", "host") else device
        if budget_bytes is not None:
            # Drop whole layers from the front (llama.cpp keeps the last ones) until it fits.
            for layer in [n] + list(range(n)):
                if self.total_bytes(device) <= budget_bytes:
                    break
                moved = [e for e in self.layer(layer) if e.home == device]
                for e in moved:
                    e.home = HOST
                if moved:
                    notes.append(f"layer {self.layer_name(layer)} kept on host to fit the VRAM budget")
        for e in self.entries.values():
            if e.home == HOST and e.state is State.RESIDENT:
                e.state = State.MAPPED
        return notes
