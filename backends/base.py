"""The backend contract: everything the scheduler, the executor and the API ask of a backend.

A backend owns its activation values (numpy arrays for the CPU, tensors for a device), its copy of
the weights it holds, and the K/V storage of the layers that live on it. The scheduler reaches it
only through the routing queries; the executor through the run hooks; capabilities a backend may
lack are declared here with their defaults, so nothing outside this file probes a backend.
"""
from __future__ import annotations

from typing import Any, Callable

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

    def owns_kv(self, store: Any) -> bool:
        """Is this K/V storage (from some backend's alloc_kv) in this backend's memory?"""
        return False

    # -- device memory and policy (optional: a host backend keeps the defaults) -----------------
    ring_slots: int = 0  # streaming ring slots fit-before-load must leave room for
    real_time: bool = True  # its timings mean something: a policy may tune itself on them

    def free_memory(self) -> int | None:
        """Bytes free for weights, K/V and buffers; None: no memory of its own to fit into."""
        return None

    def set_policy(self, policy) -> None:
        """Take a new upload policy (a backend that never uploads ignores it)."""

    def release_memory(self) -> None:
        """Give cached memory back after a failed or interrupted run."""

    def stream_stats(self) -> dict:
        """For `lstream bench`: bytes streamed per run, GB/s, share of copy hidden (empty: none)."""
        return {}

    # -- running a plan (used by the executor) ---------------------------------------------------
    def begin_run(self, plan, ctx) -> None:
        """Called once before a plan runs; a streaming backend schedules its uploads here."""

    def end_run(self) -> None:
        """Called once after a plan ran (also when it failed)."""

    def begin_group(self, runs: list) -> None:
        """Called instead of begin_run when the ubatches of one prompt run layer by layer
        (core/runner.py); runs: [(plan, ctx)], ctx.ubatch = its index."""
        self.begin_run(*runs[-1])

    def end_group(self) -> None:
        self.end_run()

    def compute(self, node: Node, inputs: list[Any], ctx) -> Any:
        raise NotImplementedError

    def attach_host(self, backend: "Backend") -> None:
        """A device backend is given the host backend that computes, inside its MoE ops, the experts
        it leaves in host memory (default: none needed)."""

    def moe_experts(self, node: Node, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """A host backend: the routed experts of a MOE node for the pairs with ids >= 0 (ids, weights:
        (T, top_k), core/moe.py), weighted and summed per token -> (T, n_embd) float32."""
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

    # -- static decode steps and their graphs (optional; core/replay.py drives them) ------------
    static_steps: bool = False  # can run a small step from static inputs (step_inputs)
    graphs: bool = False  # and capture such a step once, then replay it

    def step_inputs(self, n_tokens: int) -> Any:
        """Static inputs of a step of n_tokens (its token ids and positions in fixed buffers); set
        as RunContext.graph while the step's nodes run."""
        raise NotImplementedError

    def fill_step_inputs(self, inputs: Any, ctx) -> None:
        """Write this step's tokens and positions into the static inputs."""
        raise NotImplementedError

    def capture(self, fn: Callable[[], Any], inputs: Any, whole: bool = False) -> tuple[Any, Any]:
        """Run fn once to warm up, then record it (`inputs`: the step's static inputs, set as
        RunContext.graph): (graph, fn's outputs, which each replay refills). `whole`: a decode step
        whose output is read after every replay (its inputs and output may go through fixed host buffers)."""
        raise NotImplementedError

    def replay(self, graph: Any) -> None:
        raise NotImplementedError

    def clone(self, value: Any) -> Any:
        """A static copy of an activation (a captured segment's input)."""
        raise NotImplementedError

    def copy_into(self, static: Any, value: Any) -> None:
        raise NotImplementedError


ALL_OPS = frozenset(Op)
