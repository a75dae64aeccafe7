"""The CUDA backend: torch on the GPU, Triton dequantization, streamed non-resident layers.

Streams: compute runs on torch's current stream (so `.cpu()` and friends order themselves), weight
uploads on a copy stream (core/streaming.py), K/V write-backs to host on a third stream.
Activations: the residual stream stays fp32; matmul inputs, attention and K/V use the compute dtype,
bf16 by default: real models' activations reach thousands and some families pass float16's 65504,
so fp16 (llama.cpp's cuBLAS path) would overflow where the CPU's fp32 does not. Decode matmuls
(GEMV) accumulate and return fp32. A prefill matmul either dequantizes its weight (resident:
quantized in VRAM; streamed: from its ring slot) into one reused scratch buffer and calls cuBLAS,
or runs qgemm.py's GEMM that dequantizes tiles in registers: whichever measured faster for that
format, shape and token bucket (matmul_choice.py).

Everything device-specific goes through `self.rt` (runtime.py), so tests/fake_device.py runs this
exact code on CPU tensors in CI.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ...core.batch import UPLOAD_THRESHOLD, is_small_batch
from ...core.graph import STACKED_PROJECTIONS, Node
from ...core.ops import Op
from ...core.qtypes import QTYPE_INFO
from ...core.policy import BatchThreshold, UploadPolicy
from ...core.residency import HOST, ResidencyMap, State
from ...core.rope import cos_sin, inv_freq
from ...core.streaming import LayerStreamer
from ..base import Backend
from . import decode_kernels as dk
from . import dequant as ck
from . import fused
from . import gemv as cg, gemv_q8, matmul_choice, repack, selfcheck
from .attention import AttentionMixin, DeviceKV
from .attention_paged import attention_paged, batch_tensors
from .graphs import GraphsMixin, static_angles
from .moe import MoEMixin
from .norm_rope import rms_norm, rope
from .runtime import CudaRuntime
from .stream_run import StreamRunMixin


_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "float32": torch.float32}


class CUDABackend(StreamRunMixin, AttentionMixin, GraphsMixin, MoEMixin, Backend):
    name = "cuda"
    OPS = frozenset({Op.EMBED, Op.MATMUL, Op.RMS_NORM, Op.RMS_NORM_HEADS, Op.ADD, Op.SWIGLU, Op.GEGLU,
                      Op.SCALE, Op.ROPE, Op.ATTENTION, Op.MOE})

    def __init__(self, policy: UploadPolicy | None = None, device: str = "cuda", runtime=None,
                 dtype: str | torch.dtype = "bf16", n_slots: int = 3, use_triton: bool | None = None,
                 speculate: bool = False, cuda_graphs: bool = True, gemv: bool | None = None, fuse: bool = True,
                 repack_resident: bool | None = None, qgemm: bool | None = None, expert_cache_gib: float = 0.0, moe_share=0):
        self.policy = policy or BatchThreshold(UPLOAD_THRESHOLD)
        self.rt = runtime if runtime is not None else CudaRuntime(device)
        self.device = self.rt.device
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.ring_slots = n_slots
        # decode's host experts: VRAM for a cache of them (core/expert_cache.py), how many a step computes here
        self.expert_cache_gib, self.moe_share = expert_cache_gib, moe_share  # (expert_share.py)
        self.use_triton = use_triton
        self.speculate = speculate
        self.residency: ResidencyMap | None = None
        self._resident: dict[str, torch.Tensor] = {}  # uint8 blocks (or raw float bytes) in VRAM
        self._small: dict[str, torch.Tensor] = {}  # 1-D tensors (norms, biases) in fp32, always on device
        self._streamable: list[str] = []
        self.streamer: LayerStreamer | None = None
        self._scratch: torch.Tensor | None = None
        self._freqs: dict[tuple, torch.Tensor] = {}
        self._positions = None  # ((n_past, t), device positions) of the last eager prompt ubatch
        self._inv_freq: dict[tuple, tuple] = {}  # rope frequencies on the device, for static steps
        self._run = None  # per-run state
        self._kv_pending: list = []
        self._stacks: dict[str, tuple] = {}  # resident q/k/v, gate/up: name -> (stack, its rows, names)
        self._pend: dict[str, tuple] = {}  # sibling outputs of a stacked GEMV: name -> (input, y)
        self._kv_done: dict[int, object] = {}  # id(host K/V store) -> event after its last write-back
        self._plan_cache: dict[int, tuple] = {}
        self._hop_bufs: dict[tuple, object] = {}  # read_back / send_up: shapes -> pinned (and device) buffers
        self._pinned_kv: set[int] = set()
        self._kv_scratch: dict[tuple, DeviceKV] = {}  # cache shape -> device stand-in (host_kv_scratch)
        self._hold_release = False  # streamed layers released by the caller (core/layer_replay.py)
        self.scratch_gen = 0  # bumped when the dequantization scratch moves (graphs that wrote it are stale)
        # the quantized matrix-vector kernel, where it can run (a CUDA device with Triton's Gluon)
        self._gemv_ok = cg.HAVE_GLUON and self.device.type == "cuda" and use_triton is not False \
            and gemv is not False
        # small steps from static buffers (core/replay.py), captured as CUDA graphs on a real GPU
        self.graphs = cuda_graphs and self.device.type == "cuda"
        # resident 32-weight-block matmul weights in an aligned layout for the int8 GEMV (repack.py);
        # None: where that GEMV runs (a GPU with Triton). The newer kernels are proven on the device first.
        ok = selfcheck.kernels_ok(self.device) if self._gemv_ok else {"gemv_q8": False, "decode": False,
                                                                           "prefill": False}
        # (not in fp32, the reference precision: int8 activations would round what it promises to keep)
        self._repack = (self._gemv_ok and ok["gemv_q8"] and self.dtype != torch.float32) \
            if repack_resident is None else repack_resident
        # decode steps: fused kernels (fused.py) where a pattern of nodes allows, split-K attention
        self.decode_kernels = ok["decode"] or self.device.type != "cuda"
        self.fuse = fuse and self.decode_kernels
        # a resident prompt's ubatches replayed from graphs (core/replay.py): attention by device-side
        # positions (prefill_attention.py), proven here first; LSTREAM_PREFILL_GRAPHS=0 turns it off
        # Not in fp32, the reference precision: the kernel's dots are bf16 (SDPA keeps fp32 there).
        self.static_prefill = (self.graphs and self.decode_kernels and ok["prefill"] and self.dtype != torch.float32
                               and os.environ.get("LSTREAM_PREFILL_GRAPHS") != "0")
        # eager prompts' attention by the same kernel (LSTREAM_PREFILL_ATTN=0: cuDNN's SDPA, K/V heads repeated)
        self.prefill_attn = (self.device.type == "cuda" and ok["prefill"] and use_triton is not False
                             and self.dtype != torch.float32 and os.environ.get("LSTREAM_PREFILL_ATTN") != "0")
        # prefill matmuls straight from the quantized weight where that measures faster (matmul_choice.py)
        self._qgemm = qgemm is not False and use_triton is not False and self.device.type == "cuda" and ck.HAVE_TRITON

    # -- routing -------------------------------------------------------------------------------
    def supports_op(self, node: Node) -> bool:
        if node.op not in self.OPS:
            return False  # an op added for a new architecture runs on the CPU until it has a kernel here
        if node.weight is not None and self.residency is not None and node.weight in self.residency:
            return self.residency[node.weight].qtype in ck.SUPPORTED
        return True

    def offload_op(self, node: Node, n_tokens: int, residency: ResidencyMap) -> tuple[bool, str]:
        if node.op is Op.MOE:  # experts in host memory: decided per expert once routed (moe.py)
            return self.offload_moe(node, n_tokens, residency)
        entry = residency[node.weight] if node.weight is not None else None
        if entry is not None and entry.qtype not in ck.SUPPORTED:
            return False, f"no GPU kernel for {entry.qtype.name}"
        if node.op is Op.EMBED and residency.layer_home(0) == self.name:  # rows go where layer 0 computes
            return True, "layer 0 is resident here: only the token rows are uploaded"
        want = self.policy.should_upload(node.op, entry, n_tokens)
        if node.op is Op.EMBED and want:
            return True, f"{self.policy.describe()} at {n_tokens} tokens: only the token rows are uploaded"
        return want, f"{self.policy.describe()} {'uploads' if want else 'keeps'} at {n_tokens} tokens"

    # -- lifetime ------------------------------------------------------------------------------
    def free_memory(self) -> int:
        """Device bytes available for weights, K/V and buffers: what fit-before-load plans with."""
        return self.rt.free_memory()

    def set_policy(self, policy: UploadPolicy) -> None:
        self.policy = policy
        self.prepare_policy()

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def owns_kv(self, store) -> bool:
        return isinstance(store, DeviceKV)

    def load(self, residency: ResidencyMap) -> None:
        """Upload resident weights once; note which host weights may be streamed (2-D, supported;
        a tied output head streams under its own name). 1-D tensors are always copied here."""
        self.residency = residency
        self.prepare_policy()
        rt = self.rt
        self._reset_experts()
        for e in residency:
            if e.n_expert:  # 3-D expert tensors: resident, or uploaded expert by expert (moe.py)
                self._load_experts(e)
            elif len(e.shape) == 1 or e.n_rows == 1:
                if e.alias_of is None:
                    self._small[e.name] = ck.dequantize(rt.host_view(e.data).to(self.device), e.qtype, e.n_cols,
                                                        dtype=torch.float32, use_triton=self.use_triton).reshape(-1)
            elif e.home == self.name:
                src = self._resident.get(e.alias_of) if e.alias_of else None
                self._resident[e.name] = src if src is not None else rt.host_view(e.data).to(self.device).view(e.n_rows, -1)
                e.state = State.RESIDENT
            elif e.home == HOST and e.qtype in ck.SUPPORTED and e.name != "token_embd.weight":
                self._streamable.append(e.name)
        self._stack_experts()
        self._stack_resident()
        if self._repack:
            self._repack_resident()

    def _repack_resident(self) -> None:
        """Resident matmul weights of the 32-block types into the aligned layout, stacks as one
        (the embedding, and a head tied to it, keep GGUF blocks: their rows are gathered)."""
        done: dict[int, repack.Packed] = {}
        for name, t in list(self._resident.items()):
            e = self.residency[name]
            if e.qtype not in repack.TYPES or e.alias_of or name == "token_embd.weight":
                continue
            stack = self._stacks.get(name)
            if stack is None:
                self._resident[name] = repack.repack(t, e.qtype, e.n_rows, e.n_cols)
                continue
            big, rows, names = stack
            p = done.get(id(big))
            if p is None:
                p = done[id(big)] = repack.repack(big, e.qtype, big.shape[0], e.n_cols)
            self._resident[name] = p.rows(rows.start, rows.stop)
            self._stacks[name] = (p, rows, names)

    def _stack_resident(self) -> None:
        """Resident projections that read one input (q, k, v; gate, up) share one buffer, rows
        back to back; the single weights become row views (no extra VRAM). A decode step then reads
        them with one GEMV launch (small k/v shapes alone use the GPU poorly)."""
        self._stacks.clear()
        for il in sorted({e.layer for e in self.residency if e.layer >= 0}):
            for kinds in STACKED_PROJECTIONS:
                names = [f"blk.{il}.{k}.weight" for k in kinds]
                if not all(n in self._resident for n in names):
                    continue
                es = [self.residency[n] for n in names]
                if any(e.alias_of for e in es) or len({(e.qtype, e.n_cols) for e in es}) != 1 \
                        or es[0].qtype not in cg.GEMV_TYPES:
                    continue
                big = torch.cat([self._resident[n] for n in names])
                r0 = 0
                for n, e in zip(names, es):
                    self._resident[n] = big[r0:r0 + e.n_rows]
                    self._stacks[n] = (big, slice(r0, r0 + e.n_rows), names)
                    r0 += e.n_rows

    def prepare_policy(self) -> None:
        """A policy that decides per layer (LayerSplit, CostModel) reads the residency once."""
        if self.residency is not None:
            self.policy.prepare(self.residency, self.name)

    def unload(self) -> None:
        self.rt.synchronize()
        self._resident.clear()
        self._stacks.clear()
        self._pend.clear()
        self._small.clear()
        self.streamer = None
        self._scratch = None
        self.scratch_gen += 1
        self._kv_scratch.clear()
        self._kv_pending.clear()
        self._pinned_kv.clear()
        self._reset_experts()

    def alloc_kv(self, layer, n_ctx, n_kv_head, head_dim):
        z = lambda: torch.zeros((n_ctx, n_kv_head, head_dim), dtype=self.dtype, device=self.device)  # noqa: E731
        return DeviceKV(z(), z())

    def _matmul_src(self, name: str):
        e = self.residency[name]
        return self.residency[e.alias_of] if e.alias_of else e

    def _dequant(self, name: str, scratch: bool = True) -> torch.Tensor:
        e = self.residency[name]
        src = self.residency[e.alias_of] if e.alias_of else e
        raw = self._weight_bytes(name)
        n = src.n_rows * src.n_cols
        out = None
        if scratch:
            if self._scratch is None or self._scratch.numel() < n:
                self._scratch = torch.empty(n, dtype=self.dtype, device=self.device)
                self.scratch_gen += 1
            out = self._scratch[:n].view(src.n_rows, src.n_cols)
        if isinstance(raw, repack.Packed):
            return gemv_q8.dequantize(raw, self.dtype, out)
        return ck.dequantize(raw, src.qtype, src.n_cols, dtype=self.dtype, out=out, use_triton=self.use_triton)

    def _gemv(self, x: torch.Tensor, w, src) -> torch.Tensor:
        """Decode matmul in fp32: repacked weights by the int8 GEMV, GGUF blocks by the Gluon one."""
        if isinstance(w, repack.Packed):
            return gemv_q8.gemv(x, w, out=self._f32_out(x, w.n_rows))
        # streamed weights arrive as flat slot bytes: the rows follow from the row size, not the shape
        info = QTYPE_INFO[src.qtype]
        n_rows = w.shape[0] if w.dim() == 2 else w.numel() // (src.n_cols // info.block_size * info.type_size)
        return cg.gemv(x.to(self.dtype), w, src.qtype, n_rows, src.n_cols, out=self._f32_out(x, n_rows))

    def compile_split(self, assignments, last_use: dict, ctx):
        return fused.compile_split(self, assignments, last_use, ctx) if self.fuse else None

    # -- ops -----------------------------------------------------------------------------------
    def compute(self, node: Node, inputs, ctx):
        op, p = node.op, node.params
        if op is Op.MATMUL:
            x = inputs[0]
            src = self._matmul_src(node.weights[0])
            if is_small_batch(x.shape[0]) and self._gemv_ok and src.qtype in cg.GEMV_TYPES:
                # few tokens: read the quantized blocks once, no fp16 copy of the weight
                name = node.weights[0]
                pend = self._pend.pop(name, None)
                stack = self._stacks.get(name)
                if pend is not None and pend[0] is inputs[0]:  # computed with a sibling's stack
                    y = pend[1]
                elif stack is not None:
                    big, rows, names = stack
                    yy = self._gemv(x, big, src)
                    for n in names:
                        if n != name:
                            self._pend[n] = (inputs[0], yy[:, self._stacks[n][1]])
                    y = yy[:, rows]
                else:
                    y = self._gemv(x, self._weight_bytes(name), src)
                self._after(node, ctx)
            elif self._qgemm:  # the fused dequantizing GEMM or dequantize + cuBLAS, whichever measured faster
                name = node.weights[0]
                y = matmul_choice.matmul(x, self._weight_bytes(name), src.qtype, src.n_rows, src.n_cols, self.dtype,
                                         lambda: self._dequant(name))
                self._after(node, ctx)
            else:
                w = self._dequant(node.weights[0])
                self._after(node, ctx)
                y = x.to(self.dtype) @ w.t()
            if len(node.weights) > 1:
                y = y + self._small[node.weights[1]].to(y.dtype)
            return y
        if op is Op.RMS_NORM:
            x = inputs[0]
            if p.get("select_output") and ctx.logits == "last":
                x = x[-1:]
            elif p.get("select_output") and ctx.batch is not None and ctx.batch.out_rows is not None:
                x = x[batch_tensors(self, ctx.batch, ctx.positions)["rows"]]  # the rows that need logits
            return rms_norm(x.contiguous(), self._small[node.weights[0]], p["eps"], self.dtype, self.use_triton)
        if op is Op.RMS_NORM_HEADS:  # q/k norms (Qwen3, Gemma 3): each head normalized on its own
            x = inputs[0].contiguous()
            y = rms_norm(x.reshape(-1, p["head_dim"]), self._small[node.weights[0]], p["eps"], self.dtype,
                            self.use_triton)
            return y.reshape(x.shape)
        if op is Op.ADD:
            y = inputs[0] + inputs[1]  # the residual is fp32: promotion keeps the sum fp32
            return y if y.dtype == torch.float32 else y.float()
        if op is Op.SWIGLU or op is Op.GEGLU:
            g, u = inputs
            if g.dim() == 2 and g.stride(1) == 1 and u.stride(1) == 1:
                return dk.act(g, u, op is Op.GEGLU, self.dtype, self.use_triton)
            a = F.silu(g.float()) if op is Op.SWIGLU else F.gelu(g.float(), approximate="tanh")
            return (a * u.float()).to(self.dtype)
        if op is Op.SCALE:
            return inputs[0] * p["value"]
        if op is Op.ROPE:
            return self._rope(inputs[0], p, ctx)
        if op is Op.ATTENTION:
            if ctx.batch is not None:  # several sequences over the paged K/V cache
                return attention_paged(self, node, inputs, ctx)
            return self._attention(node, inputs, ctx)
        if op is Op.MOE:
            return self._moe(node, inputs, ctx)
        if op is Op.EMBED:
            e = self.residency[node.weights[0]]
            if ctx.graph is not None:  # a static step: rows or ids already in device buffers
                rows = ctx.graph.rows if ctx.graph.rows is not None else self._resident[node.weights[0]][ctx.graph.tokens]
                return ck.dequantize(rows, e.qtype, e.n_cols, dtype=torch.float32, use_triton=self.use_triton)
            ids = torch.as_tensor(np.asarray(inputs[0], dtype=np.int64), device=self.device) \
                if node.weights[0] in self._resident else None
            if node.weights[0] in self._resident:
                rows = self._resident[node.weights[0]][ids]
            else:  # gather the token rows on the host, upload only them (a few MB, still quantized)
                host = np.asarray(e.data).reshape(e.n_rows, -1)
                rows = torch.from_numpy(host[np.asarray(inputs[0], dtype=np.int64)]).to(self.device)
            return ck.dequantize(rows, e.qtype, e.n_cols, dtype=torch.float32, use_triton=self.use_triton)
        raise NotImplementedError(f"{self.name} backend: op {op}")

    def _f32_out(self, x: torch.Tensor, n_rows: int) -> torch.Tensor:
        return torch.empty((x.shape[0], n_rows), dtype=torch.float32, device=self.device)

    def static_cos_sin(self, p: dict, ctx):
        """cos/sin (T, n_rot/2) fp32 of a static step's device-side positions, computed there in
        fp64 (like core/rope.py) once per step: every layer's q and k share them."""
        key = (p["base"], p["n_rot"], id(p["scaling"]))
        cs = ctx.graph.cache.get(key)
        if cs is None:
            f = self._inv_freq.get(key)
            if f is None:
                f = self._inv_freq[key] = (torch.from_numpy(inv_freq(p["base"], p["n_rot"], p["scaling"]))
                                           .to(self.device), p["scaling"])
            cs = ctx.graph.cache[key] = static_angles(ctx.graph.positions, f[0])
        return cs

    def _rope(self, x: torch.Tensor, p: dict, ctx) -> torch.Tensor:
        if ctx.graph is not None:
            cos, sin = self.static_cos_sin(p, ctx)
            return rope(x.contiguous(), cos, sin, p["n_head"], p["head_dim"], p["n_rot"],
                        p["mode"] == "neox", self.dtype, self.use_triton)
        pos = np.asarray(ctx.positions)
        arange = len(pos) > 0 and pos[-1] - pos[0] == len(pos) - 1 and bool(np.all(np.diff(pos) == 1))
        key = (int(pos[0]) if arange else id(ctx.positions), len(pos), p["base"], p["n_rot"], id(p["scaling"]))
        cs = self._freqs.get(key)
        if cs is None:
            if len(self._freqs) > 64:
                self._freqs.clear()
            cos, sin = cos_sin(pos, inv_freq(p["base"], p["n_rot"], p["scaling"]))
            cs = self._freqs[key] = (torch.from_numpy(cos).to(self.device), torch.from_numpy(sin).to(self.device),
                                     ctx.positions, p["scaling"])  # keep what the ids name alive
        return rope(x.contiguous(), cs[0], cs[1], p["n_head"], p["head_dim"], p["n_rot"], p["mode"] == "neox",
                       self.dtype, self.use_triton)

    # -- activations ---------------------------------------------------------------------------
    def to_host(self, value) -> np.ndarray:
        return value.float().cpu().numpy()

    def from_host(self, array: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def synchronize(self) -> None:
        self.rt.synchronize()

    def describe(self) -> str:
        dev = self.device if self.device.type != "cuda" else torch.cuda.get_device_name(self.device)
        return f"{self.name} ({dev}, {str(self.dtype).replace('torch.', '')}, policy {self.policy.describe()})"


__all__ = ["CUDABackend", "CudaRuntime", "DeviceKV"]
