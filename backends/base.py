"""The backend contract. The scheduler reaches a backend only through these queries.

A backend owns its activation values (numpy arrays for the CPU, tensors for a device), its
copy of the weights it holds, and the K/V storage of the layers that live on it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.graph import Node
from ..core.ops import Op
from ..core.residency import ResidencyMap


class Backend:
    name: str = "base"

    # -- routing contract (used by the scheduler) --------------------------------------------
    def supports_op(self, node: Node) -> bool:
        """Can this backend compute the node at all?"""
        raise NotImplementedError

    def offload_op(self, node: Node, n_tokens: int, residency: ResidencyMap) -> tuple[bool, str]:
        """Does this backend want to run a node whose weight lives elsewhere? (yes/no, why)"""
        return False, "no offload"

    # -- lifetime ------------------------------------------------------------------------------
    def load(self, residency: ResidencyMap) -> None:
        """Take the weights whose home is this backend (upload, pin, repack)."""

    def unload(self) -> None:
        """Free everything load() and the runs allocated."""

    def alloc_kv(self, layer: int, n_ctx: int, n_kv_head: int, head_dim: int) -> Any:
        """K/V storage for one layer living on this backend."""
        raise NotImplementedError

    # -- running a plan (used by the executor) ---------------------------------------------------
    def begin_run(self, plan, ctx) -> None:
        """Called once before a plan runs; a streaming backend schedules its uploads here."""

    def end_run(self) -> None:
        """Called once after a plan ran (also when it failed)."""

    def begin_group(self, runs: list) -> None:
        """Called instead of begin_run when the ubatches of one prompt run layer by layer
        (core/executor.py run_layer_major); runs: [(plan, ctx)], ctx.ubatch = its index."""
        self.begin_run(*runs[-1])

    def end_group(self) -> None:
        self.end_run()

    def compute(self, node: Node, inputs: list[Any], ctx) -> Any:
        raise NotImplementedError

    def compile_split(self, assignments: list, last_use: dict, ctx) -> list | None:
        """Optionally, a split's nodes as units: a Node runs through compute(), a core.executor.Fused
        runs a whole run of nodes in one call (the CPU's decode programs). None: op by op.
        The executor caches the answer per plan, split, token count, logits mode and profiling."""
        return None

    def to_host(self, value: Any) -> np.ndarray:
        return value

    def from_host(self, array: np.ndarray) -> Any:
        return array

    def synchronize(self) -> None:
        pass

    def describe(self) -> str:
        return self.name


ALL_OPS = frozenset(Op)
