"""The CUDA backend's side of replayed decode steps (core/replay.py drives them): static step
inputs in device buffers, capture of a step into a CUDA graph, its replay, and the hop of a host-expert
MoE op between two replayed segments (read_back / send_up). A mixin of CUDABackend.

A step runs in "static" mode (RunContext.graph is a StepInputs): token ids and positions live in
fixed device buffers that are refilled before each replay; attention reads each token's position
there and attends up to it, so one graph serves every position.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ...core.ops import Op
from .prefill_attention import supported


@dataclass
class StepInputs:
    tokens: torch.Tensor  # (B,) int64 on the device
    positions: torch.Tensor  # (B,) int64 on the device
    rows: torch.Tensor | None  # (B, row_bytes) uint8: the token_embd rows when it lives on the host
    cache: dict = field(default_factory=dict)  # per-step values shared by the layers (rope cos/sin, mask)
    # layer -> DeviceKV standing in for a host layer's K/V cache (a layer-major prompt, core/layer_replay.py)
    kv: dict = field(default_factory=dict)
    staged: StagedIO | None = None  # a whole decode step's pinned inputs and output, copied inside its graph


@dataclass
class StagedIO:
    """Pinned host mirrors of a whole decode step's token ids, positions and output: the graph copies
    them in first and the output out last, so a token's host turnaround is a numpy write, one replay
    and one wait (no pageable copies, no allocation). Only for steps whose output is read before the
    next step is filled (the mirrors are reused)."""
    tokens: torch.Tensor  # (B,) int64, pinned
    positions: torch.Tensor
    value: torch.Tensor | None = None  # the device output the graph copies out
    out: torch.Tensor | None = None  # its float32 pinned copy


def static_angles(positions: torch.Tensor, inv_freq_dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin (T, n_rot/2) fp32 of device-side positions, computed in fp64 like core/rope.py."""
    ang = positions.to(torch.float64)[:, None] * inv_freq_dev[None, :]
    return ang.cos().float(), ang.sin().float()


# the pinned step mirrors (LSTREAM_STAGED_IO=0: pageable copies before and after each replay, to compare)
STAGED_IO = os.environ.get("LSTREAM_STAGED_IO") != "0"


class GraphsMixin:
    static_steps = True

    def step_inputs(self, n_tokens: int) -> StepInputs:
        dev = self.device
        emb = self.residency["token_embd.weight"] if "token_embd.weight" in self.residency else None
        rows = None
        if emb is not None and "token_embd.weight" not in self._resident:  # rows copied in per step
            rows = torch.zeros((n_tokens, emb.nbytes // emb.n_rows), dtype=torch.uint8, device=dev)
        return StepInputs(torch.zeros(n_tokens, dtype=torch.int64, device=dev),
                          torch.zeros(n_tokens, dtype=torch.int64, device=dev), rows)

    def fill_step_inputs(self, si: StepInputs, ctx) -> None:
        if si.staged is not None:  # the replay copies these in
            si.staged.tokens.numpy()[:] = ctx.tokens
            si.staged.positions.numpy()[:] = ctx.positions
            return
        toks = np.asarray(ctx.tokens, dtype=np.int64)
        si.tokens.copy_(torch.from_numpy(toks))
        si.positions.copy_(torch.from_numpy(np.asarray(ctx.positions, dtype=np.int64)))
        if si.rows is not None:
            e = self.residency["token_embd.weight"]
            host = np.ascontiguousarray(e.data).reshape(e.n_rows, -1).view(np.uint8)
            si.rows.copy_(torch.from_numpy(host[toks]))

    def prompt_inputs(self, n_tokens: int) -> StepInputs:
        """Static inputs of a layer-major prompt's ubatch: positions only (its embedding runs eagerly)."""
        z = torch.zeros(n_tokens, dtype=torch.int64, device=self.device)
        return StepInputs(z, z.clone(), None)

    def fill_positions(self, si: StepInputs, ctx) -> None:
        """The ubatch's positions into the static buffer, and every cached RoPE cos/sin recomputed in
        place from them (captured graphs read those tensors)."""
        si.positions.copy_(torch.from_numpy(np.asarray(ctx.positions, dtype=np.int64)))
        for key, cs in si.cache.items():
            f = self._inv_freq.get(key)
            if f is not None:
                cos, sin = static_angles(si.positions, f[0])
                cs[0].copy_(cos)
                cs[1].copy_(sin)

    def capture_part(self, fn, pool):
        """Capture fn (already run eagerly once with these shapes: kernels compiled, matmul choices
        made) into a graph on a side stream, its memory from `pool`, shared by graphs replayed in the
        order they were captured. Nothing runs: the eager run made this ubatch's values."""
        dev = self.device
        if getattr(self, "_capture_stream", None) is None:
            self._capture_stream = torch.cuda.Stream(dev)
        side = self._capture_stream
        side.wait_stream(torch.cuda.current_stream(dev))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool)
            try:
                fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(dev).wait_stream(side)
        return graph

    def graph_pool(self):
        return torch.cuda.graph_pool_handle()

    def static_prefill_ok(self, plan) -> bool:
        """A prompt ubatch of this plan can run in static form: its attention heads fit the prefill
        kernel (prefill_attention.supported), and its MoE ops' experts are resident and computed by
        moe_kernels (routed and sorted on the device, no host sync). Experts in host memory are routed
        on the host (which to upload): such a prompt runs eagerly."""
        for a in plan.assignments():
            op = a.node.op
            if op is Op.MOE and a.node.weights[0] not in self._moe_w:
                return False
            if op is Op.ATTENTION and not supported(a.node.params["head_dim"]):
                return False
        return True

    def capture(self, fn, inputs: StepInputs, whole: bool = False, warm: bool = True):
        """Warm up (Triton compiles, cuBLAS workspaces, scratch buffers) on a side stream with the
        real inputs, then capture. A warm-up writes the step's own K/V rows, which the replay right
        after writes again with the same values. `whole`: a decode step whose output the caller
        reads after every replay: its inputs and output go through pinned mirrors (StagedIO).
        warm=False: the caller has warmed up with an eager run of its own."""
        dev = self.device
        if warm:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream(dev).wait_stream(side)
        inputs.cache.clear()  # the capture must record how the shared per-step values are made
        graph = torch.cuda.CUDAGraph()
        io = None
        if whole and inputs.rows is None and STAGED_IO and self.device.type == "cuda":
            n = inputs.tokens.numel()
            io = StagedIO(*(self.rt.alloc_host(8 * n)[0].view(torch.int64) for _ in range(2)))
        with torch.cuda.graph(graph):
            if io is not None:
                inputs.tokens.copy_(io.tokens, non_blocking=True)
                inputs.positions.copy_(io.positions, non_blocking=True)
            out = fn()
            if io is not None and isinstance(out, torch.Tensor):
                io.value, io.out = out, self._pinned_f32(out.shape)
                io.out.copy_(out.float(), non_blocking=True)
        if io is not None:
            io.tokens.copy_(inputs.tokens.cpu())  # what the warm-up ran with, until the next fill
            io.positions.copy_(inputs.positions.cpu())
            inputs.staged = io
        return graph, out

    def staged_output(self, si: StepInputs, value) -> np.ndarray | None:
        """The step's output as float32 numpy from its pinned mirror after the replay finishes (None:
        not a staged step). A copy: the mirror is rewritten by the next replay."""
        io = si.staged if isinstance(si, StepInputs) else None
        if io is None or io.value is not value:
            return None
        torch.cuda.current_stream(self.device).synchronize()
        return io.out.numpy().copy()

    def replay(self, graph) -> None:
        graph.replay()

    def clone(self, value):
        return value.clone()

    def copy_into(self, static, value) -> None:
        static.copy_(value)

    def hop_mailbox(self, n_hops: int):
        """The pinned flags and buffers of a step's n expert hops served in one graph (core/hop_replay.py)."""
        from .mailbox import DeviceMailbox
        return DeviceMailbox(self.rt, self.device, n_hops)

    def hop_share(self, box):
        """--moe-share N in a step replayed as one graph: the device's part of each hop (hop_share.py),
        or None (no share asked, or the expert kernels unavailable)."""
        if self.moe_share == 0 or self.expert_cache_gib or not self._use_moe_kernels():
            return None
        from .hop_share import HopShare
        return HopShare(self, box, self.moe_share)

    # A decode step's hop to the host and back between two replayed segments (core/replay.py), through
    # pinned buffers kept per shape: the values read back with one wait, the answer sent up without any.
    def read_back(self, values: list) -> list[np.ndarray]:
        """Device values -> float32 host arrays (views of pinned buffers, valid until the next call),
        after one wait for all of them."""
        key = ("down",) + tuple(tuple(v.shape) for v in values)
        hit = self._hop_bufs.get(key)
        if hit is None:
            hit = self._hop_bufs[key] = ([self._pinned_f32(v.shape) for v in values], self.rt.new_event())
        bufs, ev = hit
        for b, v in zip(bufs, values):
            self.rt.copy(b, v, self.rt.compute_stream)
        ev.record(self.rt.compute_stream)
        ev.synchronize()
        return [b.numpy() for b in bufs]

    def send_up(self, array: np.ndarray):
        """A float32 host array -> a device tensor, copied from a pinned buffer on the compute stream
        (no wait: what reads it comes later on that stream). Two device buffers per shape in turn: the
        reader of the previous one (the next segment) is enqueued before this copy."""
        key = ("up", array.shape)
        hit = self._hop_bufs.get(key)
        if hit is None:
            dev = [torch.empty(array.shape, dtype=torch.float32, device=self.device) for _ in range(2)]
            hit = self._hop_bufs[key] = [self._pinned_f32(array.shape), dev, 0, self.rt.new_event()]
        pin, dev, k, ev = hit
        ev.synchronize()  # the previous copy out of `pin` has run (it has: the caller waited since)
        pin.numpy()[...] = array
        hit[2] = 1 - k
        self.rt.copy(dev[k], pin, self.rt.compute_stream)
        ev.record(self.rt.compute_stream)
        return dev[k]

    def _pinned_f32(self, shape) -> torch.Tensor:
        n = int(np.prod(shape))
        buf, _ = self.rt.alloc_host(4 * max(n, 1))
        return buf[:4 * n].view(torch.float32).view(tuple(shape))
