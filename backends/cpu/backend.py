"""The CPU backend: numba kernels on the quantized blocks, where the weights already are.
Last in priority and able to run every op; configured by core.options.Options."""
from __future__ import annotations

import os
import time
from typing import NamedTuple

import numpy as np

from ...core.batch import GEMM_MIN_TOKENS, is_small_batch
from ...core.graph import STACKED_PROJECTIONS, Node
from ...core.ops import Op
from ...core.options import ACT8_AUTO_BYTES, Options
from ...core.residency import HOST, ResidencyMap, TensorEntry
from ...core.rope import cos_sin, inv_freq
from ..base import Backend
from . import attention as A
from . import moe
from . import ops as O
from .attention_paged import attention_paged
from .dequant import dequantize
from .host_kv import HostKV
from .llvm_ir import HAVE_AVX2
from .matmul import BLAS_USABLE, NEVER, matmul
from .threads import set_threads
from .weights import PackedWeight, blk_types, concat_rows, get_rows, pack


def physical_cores(sysfs: str = "/sys/devices/system/cpu") -> int:
    """Physical cores (not SMT threads) this process may use: llama.cpp's -t default, counted as it
    counts them, by distinct thread-sibling sets (a VM's core_id numbering need not be unique)."""
    try:
        allowed = os.sched_getaffinity(0)
        cores = set()
        for cpu in allowed:
            with open(f"{sysfs}/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        return max(1, len(cores))
    except (OSError, AttributeError):
        return max(1, (os.cpu_count() or 2) // 2)


class Stack(NamedTuple):
    """Projections that read one input (q|k|v, gate|up), stacked into one weight: one matmul computes
    all of them, each one's output is its column range."""
    weight: PackedWeight
    cols: slice  # this projection's columns of the stacked output
    names: tuple[str, ...]  # every projection of the stack, in order


class CPUBackend(Backend):
    name = HOST

    def __init__(self, n_threads: int | None = None, options: Options | None = None):
        """n_threads: None: options.n_threads, else the physical cores. options: None: Options.from_env()."""
        self.options = options = options if options is not None else Options.from_env()
        self.n_threads = n_threads or options.n_threads or physical_cores()
        self.programs = options.cpu_programs and HAVE_AVX2  # decode runs as compiled programs
        self.blk_types = blk_types(options.cpu_blk)  # quant types kept as GGUF blocks
        self._act8 = options.cpu_act8  # int8 activations for the "nibw" weights (Options.cpu_act8; None: by size)
        self.act8 = bool(self._act8)
        self.blas = options.blas_prefill and BLAS_USABLE  # sgemm from numba's threads
        self.gemm_min_tokens = GEMM_MIN_TOKENS if self.blas else NEVER  # tools/accuracy_check sets 1
        self.adaptive_threads = options.adaptive_threads
        set_threads(self.n_threads)  # starts the thread pool (its wait policy first)
        self.residency: ResidencyMap | None = None
        self._packed: dict[str, PackedWeight] = {}
        self._vectors: dict[str, np.ndarray] = {}
        self._freqs: dict[tuple, np.ndarray] = {}
        self._f32s: dict[float, np.float32] = {}
        self._stacks: dict[str, Stack] = {}  # weight name -> its stack
        self._experts: dict = {}  # 3-D expert tensor name -> moe.Experts (packed at load)
        # Sibling outputs of a stacked matmul, waiting for their node: weight name -> (input, output)
        self._pending: dict[str, tuple] = {}
        self._cs = None  # (positions array, freqs key, cos, sin) of the current run
        self._decode_stats: dict[int, float] = {}  # threads -> recent seconds per decode run
        self._decode_runs = 0
        self._run_t0 = None
        self._run_threads = self.n_threads
        self._run_probe = False
        self._run_limit = None
        self._probe_every = self._ADAPT_PROBE_MIN
        # the device's part of decode FFNs (backends/cuda/ffn_share.py): set by it, read by programs
        self.share = None
        self.share_w: dict[tuple[str, int], PackedWeight] = {}  # ffn_share.cpu_weight's

    def set_threads(self, n: int) -> None:
        self.n_threads = n
        set_threads(n)
        self._decode_stats.clear()
        self._probe_every = self._ADAPT_PROBE_MIN

    def supports_op(self, node: Node) -> bool:
        return True

    def load(self, residency: ResidencyMap) -> None:
        self.residency = residency
        if self._act8 is None:  # int8 activations where decode is memory-bound (Options.cpu_act8)
            # (experts too: a host-expert MoE's decode reads its routed experts' bytes)
            host = sum(e.nbytes for e in residency if e.home == HOST and (len(e.shape) == 2 or e.n_expert)
                       and e.layer >= 0 and e.alias_of is None)
            self.act8 = host >= ACT8_AUTO_BYTES
        for e in residency:  # repack what this backend computes with, before the first token
            if e.home == HOST and len(e.shape) == 2:
                self.weight(e.name)
            elif e.home == HOST and e.n_expert:
                moe.experts_of(self, e.name)
        self._stack_projections()

    def _stack_projections(self) -> None:
        """Projections that read the same input (q, k, v; gate, up) are stacked into one weight so
        that one matmul call computes them all (decode: a third of the calls and thread-pool
        launches).  The single weights become row views of the stack (no extra memory)."""
        self._stacks.clear()
        layers = {e.layer for e in self.residency if e.layer is not None and e.layer >= 0}
        for il in layers:
            for kinds in STACKED_PROJECTIONS:
                names = tuple(f"blk.{il}.{k}.weight" for k in kinds)
                if not all(n in self.residency for n in names):
                    continue
                es = [self.residency[n] for n in names]
                if any(e.home != HOST or e.alias_of for e in es):
                    continue
                ws = [self._packed.get(n) for n in names]
                if any(w is None or w.layout == "float" for w in ws) or \
                        len({(w.qtype, w.n_cols, w.layout) for w in ws}) != 1:
                    continue
                big, views = concat_rows(ws)
                c0 = 0
                for n, v in zip(names, views):
                    self._packed[n] = v
                    self._stacks[n] = Stack(big, slice(c0, c0 + v.n_rows), names)
                    c0 += v.n_rows

    def begin_run(self, plan, ctx) -> None:
        self._pending.clear()
        self._cs = None
        self._run_t0 = self._run_limit = None
        if self.adaptive_threads and is_small_batch(len(ctx.tokens)) and self.n_threads > 1:
            self._run_threads = self._pick_decode_threads()
            set_threads(self._run_threads)
            one = self._decode_stats.get(1)
            # a multi-thread step slower than 1.5 one-thread steps finishes on one thread (a
            # contended probe would otherwise cost up to ~1 s)
            self._run_limit = 1.5 * one if (one is not None and self._run_threads > 1) else None
            self._run_t0 = time.perf_counter()

    def end_run(self) -> None:
        self._pending.clear()
        self._cs = None
        if self._run_t0 is not None:
            dt = time.perf_counter() - self._run_t0
            st = self._decode_stats
            n = self._run_threads
            # a probe (or first try) takes its fresh measurement; the chosen count averages
            if self._run_probe:
                won = dt < min(v for c, v in st.items() if c != n)
                # probes back off while they lose (a 2-thread step on a loaded VM costs ~10x)
                self._probe_every = self._ADAPT_PROBE_MIN if won else min(2 * self._probe_every,
                                                                          self._ADAPT_PROBE_MAX)
            st[n] = dt if (n not in st or self._run_probe) else 0.7 * st[n] + 0.3 * dt
            set_threads(self.n_threads)
            self._run_t0 = self._run_limit = None

    # Decode steps (few tokens) are ~100 short parallel kernels.  On 2 busy vCPUs a spinning
    # OpenMP barrier waits a whole scheduler tick whenever another process holds one of them
    # (measured: 8 t/s with 2 threads vs 45 t/s with 1 under load 3-4, 134 vs ~100 idle).  So with
    # Options.adaptive_threads, decode runs (up to SMALL_BATCH tokens) time themselves and use
    # whichever of n_threads and 1 was faster lately, trying the other one now and then (every 8
    # steps, backing off to 128 while the probes lose).  Results are identical either way (rows never
    # split across threads).  Prefill always uses n_threads.  Off by default: on a quiet machine fixed
    # -t decodes faster (SmolLM2 -t 2: 88-95 vs 82 t/s back to back) and on the 16-core H100 host it
    # fell to 4 t/s.
    _ADAPT_PROBE_MIN = 8  # decode steps between probes of the other thread count: 8, 16, ... 128
    _ADAPT_PROBE_MAX = 128

    def _pick_decode_threads(self) -> int:
        st = self._decode_stats
        self._decode_runs += 1
        cands = (self.n_threads, 1)
        self._run_probe = False
        for c in cands:
            if c not in st:
                return c
        best = min(cands, key=lambda c: st[c])
        if self._decode_runs >= self._probe_every:
            self._decode_runs = 0
            self._run_probe = True
            return cands[1] if best == cands[0] else cands[0]
        return best

    def compile_split(self, assignments, last_use: dict, ctx):
        """Decode splits (up to SMALL_BATCH tokens): runs of their nodes compiled into single numba
        calls (program.py), or None: op by op (Options.cpu_programs off, or nothing to compile)."""
        from . import program
        if not self.programs or not is_small_batch(len(ctx.tokens)):
            return None
        units = program.compile_split(self, assignments, last_use, ctx)
        return units if any(isinstance(u, program.Program) for u in units) else None

    def unload(self) -> None:
        self._packed.clear()
        self.share, self.share_w = None, {}
        self._experts.clear()
        self._vectors.clear()
        self.residency = None

    def alloc_kv(self, layer, n_ctx, n_kv_head, head_dim):
        return HostKV(np.zeros((n_ctx, n_kv_head, head_dim), np.float32),
                      np.zeros((n_ctx, n_kv_head, head_dim), np.float32), allow_half=self.options.host_kv_half)

    # -- weights and per-run constants (also read by program.py) -----------------------------
    def weight(self, name: str) -> PackedWeight:
        """The packed weight of tensor `name` (packed on first use; an alias shares its source's)."""
        w = self._packed.get(name)
        if w is None:
            e: TensorEntry = self.residency[name]
            src = self.residency[e.alias_of] if e.alias_of else e
            w = self._packed.get(src.name)
            if w is None:
                w = pack(src.qtype, src.data, src.n_rows, src.n_cols, self.blk_types)
                w.act8 = self.act8
                self._packed[src.name] = w
            self._packed[name] = w
        return w

    def vector(self, name: str) -> np.ndarray:
        """Tensor `name` (a norm weight, a bias) as float32 1-D, dequantized once."""
        v = self._vectors.get(name)
        if v is None:
            e = self.residency[name]
            v = dequantize(e.qtype, np.asarray(e.data).reshape(1, -1), e.n_cols).reshape(-1)
            v = self._vectors[name] = np.ascontiguousarray(v, dtype=np.float32)
        return v

    def stack_of(self, name: str) -> Stack | None:
        """The stack weight `name` is part of, or None."""
        return self._stacks.get(name)

    def _f32(self, v: float) -> np.float32:
        f = self._f32s.get(v)
        if f is None:
            f = self._f32s[v] = np.float32(v)
        return f

    def cos_sin(self, ctx, p: dict):
        """cos/sin of the run's positions, computed once per run (every layer's q and k share them)."""
        key = (p["base"], p["n_rot"], id(p["scaling"]))
        cs = self._cs
        if cs is None or cs[0] is not ctx.positions or cs[1] != key:
            cos, sin = cos_sin(ctx.positions, self._rope_freqs(p))
            cs = self._cs = (ctx.positions, key, cos, sin)
        return cs[2], cs[3]

    def _rope_freqs(self, p: dict) -> np.ndarray:
        key = (p["base"], p["n_rot"], id(p["scaling"]))
        f = self._freqs.get(key)
        if f is None:
            f = self._freqs[key] = inv_freq(p["base"], p["n_rot"], p["scaling"])
        return f

    # -- ops ---------------------------------------------------------------------------------
    def compute(self, node: Node, inputs, ctx):
        f = self._OPS.get(node.op)
        if f is None:
            raise NotImplementedError(f"CPU backend: op {node.op}")
        return f(self, node, inputs, ctx)

    def _matmul(self, node, inputs, ctx):
        if self._run_limit is not None and time.perf_counter() - self._run_t0 > self._run_limit:
            set_threads(1)
            self._run_limit = None
        name = node.weights[0]
        pend = self._pending.pop(name, None)
        # several sequences (continuous batching): per-token kernels at any size, never sgemm, so a
        # token's result does not depend on the ubatch it is in
        gemm_min = NEVER if ctx.batch is not None else self.gemm_min_tokens
        if pend is not None and pend[0] is inputs[0]:  # computed by a sibling's stacked matmul
            y = pend[1]
        else:
            x = np.ascontiguousarray(inputs[0], dtype=np.float32)
            st = self._stacks.get(name)
            if st is not None:
                yy = matmul(st.weight, x, None, self.blas, gemm_min)
                for n in st.names:
                    if n != name:
                        self._pending[n] = (inputs[0], yy[:, self._stacks[n].cols])
                y = yy[:, st.cols]
            else:
                y = matmul(self.weight(name), x, None, self.blas, gemm_min)
        if len(node.weights) > 1:
            y += self.vector(node.weights[1])
        return y

    def _rms_norm(self, node, inputs, ctx):
        p = node.params
        x = inputs[0]
        if p.get("select_output") and ctx.logits == "last":
            x = x[-1:]
        elif p.get("select_output") and ctx.batch is not None and ctx.batch.out_rows is not None:
            x = x[ctx.batch.out_rows]  # several sequences: the rows that need logits
        w = self.vector(node.weights[0])
        if x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous:  # the usual case: no wrapper
            out = np.empty_like(x)
            (O.rms_norm_parallel if x.shape[0] >= O.PAR_MIN else O.rms_norm_serial)(x, w, self._f32(p["eps"]), out)
            return out
        return O.rms_norm(np.ascontiguousarray(x, dtype=np.float32), w, p["eps"])

    def _rms_norm_heads(self, node, inputs, ctx):
        """q/k norms (Qwen3, Gemma 3): each head normalized on its own."""
        p = node.params
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        return O.rms_norm(x.reshape(-1, p["head_dim"]), self.vector(node.weights[0]), p["eps"]).reshape(x.shape)

    def _add(self, node, inputs, ctx):
        return inputs[0] + inputs[1]

    def _gated(self, node, inputs, ctx):
        g, u = inputs
        swiglu = node.op is Op.SWIGLU
        if g.ndim == 2 and u.ndim == 2 and g.dtype == u.dtype == np.float32 and g.strides[1] == u.strides[1] == 4:
            out = np.empty(g.shape, np.float32)
            (O.act_parallel if g.shape[0] >= O.PAR_MIN else O.act_serial)(
                O.ACT_SILU if swiglu else O.ACT_GELU, g, u, True, out)
            return out
        return O.swiglu(g, u) if swiglu else O.geglu(g, u)

    def _scale(self, node, inputs, ctx):
        return inputs[0] * np.float32(node.params["value"])

    def _rope(self, node, inputs, ctx):
        p = node.params
        x = inputs[0]
        n = len(ctx.positions)
        if x.ndim != 2 or x.shape[0] != n:
            x = x.reshape(n, -1)
        cos, sin = self.cos_sin(ctx, p)
        # out of place: reads the (row-strided) q/k slice directly, no copy first
        return O.rope(x, cos, sin, p["n_head"], p["head_dim"], p["n_rot"], p["mode"] == "neox").reshape(n, -1)

    def _attention(self, node, inputs, ctx):
        p = node.params
        q, k, v = inputs
        kv: HostKV = ctx.kv.layers[node.layer]
        if ctx.batch is not None:  # several sequences over the paged K/V cache
            return attention_paged(q, k, v, kv, ctx.batch, ctx.positions, p["n_head"], p["n_head_kv"],
                                   p["head_dim"], p["scale"], p.get("window", 0))
        n_kv, hd, t = p["n_head_kv"], p["head_dim"], q.shape[0]
        n_head = p["n_head"]
        if (t < A.ATT_SGEMM_MIN_TOK or not self.blas) and q.ndim == k.ndim == v.ndim == 2 \
                and q.dtype == k.dtype == v.dtype == np.float32 and q.strides[1] == k.strides[1] == v.strides[1] == 4 \
                and kv.k.flags.c_contiguous and kv.v.flags.c_contiguous and kv.k.dtype == np.float32:
            # decode and small batches: cache write + attention in one numba call
            out = np.empty((t, n_head * hd), np.float32)
            args = (ctx.n_past, n_head, n_kv, hd, self._f32(p["scale"]), int(p.get("window", 0) or 0), out)
            if kv.half(ctx.n_past):  # deep: over the cache's float16 mirror (host_kv.py)
                kv.n_half[0] = A.attention_decode_half(q, k, v, kv.k, kv.v, kv.kh, kv.vh, kv.n_half[0], *args)
            else:
                A.attention_decode(q, k, v, kv.k, kv.v, *args)
            return out
        kv.k[ctx.n_past:ctx.n_past + t] = k.reshape(t, n_kv, hd)
        kv.v[ctx.n_past:ctx.n_past + t] = v.reshape(t, n_kv, hd)
        # numba, not numpy: a BLAS call between the numba kernels makes both thread pools spin
        # against each other (tools/kernel_notes.md)
        return A.attention(q, kv.k, kv.v, ctx.n_past, n_head, n_kv, hd, p["scale"], p.get("window", 0),
                           use_blas=self.blas)

    def _moe(self, node, inputs, ctx):
        return moe.compute(self, node, inputs, ctx)

    def moe_decode(self, node, x, logits):
        return moe.decode(self, node, x, logits)

    def moe_hop(self, node, inputs):
        """A decode step's MoE op on host values: x, the router's logits[, the shared expert's output]."""
        return moe.decode(self, node, *inputs) if len(inputs) == 2 else moe.compute(self, node, inputs, None)

    def moe_route(self, node, logits):
        return moe.route_small(node, logits)

    def moe_experts(self, node, x, ids, weights):
        return moe.experts_ffn(self, node, x, ids, weights)

    def _embed(self, node, inputs, ctx):
        return get_rows(self.weight(node.weights[0]), np.asarray(inputs[0]))

    _OPS = {Op.MATMUL: _matmul, Op.RMS_NORM: _rms_norm, Op.RMS_NORM_HEADS: _rms_norm_heads, Op.ADD: _add,
            Op.SWIGLU: _gated, Op.GEGLU: _gated, Op.SCALE: _scale, Op.ROPE: _rope, Op.ATTENTION: _attention,
            Op.EMBED: _embed, Op.MOE: _moe}
