"""The MOE op on the CUDA backend (a mixin of CUDABackend).

Experts resident here: routed on the device (no host sync: a static decode step stays capturable).
At load each layer's gate and up experts are stacked per expert (one tensor, the same bytes), and the
kernels of moe_kernels.py compute the routed experts: decode (<= SMALL_BATCH tokens, or any batch
in fp32) by two fused GEMV launches over the selected experts' rows, prefill by two grouped GEMMs
over the tokens sorted by expert on the device. Without Triton, with gate and up of different
types, or with LSTREAM_MOE_KERNELS=0, the first path: a few tokens gather their experts' blocks by
id and multiply them batched, larger batches dequantize each used expert once for its tokens.
Experts in host memory (--cpu-moe, --n-cpu-moe, -ot exps=cpu):
the scheduler gives the op to this backend when the policy could upload one of them at this batch
size; then the ubatch is routed (on the device for a prompt, its ids read back), every expert with
enough routed tokens
(UploadPolicy.should_upload_expert) is uploaded through the expert slots (core/expert_streaming.py)
and computed here, and the others are computed by the host backend meanwhile (one hop each way).
A prompt ubatch whose layer a prefetch brought whole skips the host: routed and computed here."""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ...core.batch import is_small_batch
from ...core.moe import expert_counts, group, route
from ...core.ops import Op
from ...core.residency import HOST, State
from . import dequant as ck
from . import moe_kernels as mk
from . import moe_q8
from .repack import TYPES as REPACK_TYPES, repack
from . import selfcheck


class MoEMixin:
    host = None  # the backend computing the experts left in host memory (Model attaches the CPU's)

    def attach_host(self, backend) -> None:
        self.host = backend

    def _reset_experts(self) -> None:
        self._experts_dev: dict[str, torch.Tensor] = {}  # resident: (n_expert, expert bytes) uint8
        self._host_experts: list[str] = []  # in host memory, may be uploaded expert by expert
        self._moe_w: dict[str, tuple[mk.Experts, mk.Experts]] = {}  # gate name -> (gate|up, down) for the kernels
        self._gu: dict[str, torch.Tensor] = {}  # gate name -> its layer's (n_expert, 2 * expert bytes) gate|up
        self._moe_kernels: bool | None = None  # decided at the first resident expert tensor
        self.expert_streamer = None
        self._expert_cache = None  # core/expert_cache.py, made with the streamer when --expert-cache is set
        self._share = None  # expert_share.py, made at the first host-expert decode hop

    def _use_moe_kernels(self) -> bool:
        if self._moe_kernels is None:
            self._moe_kernels = os.environ.get("LSTREAM_MOE_KERNELS") != "0" and (
                self.device.type != "cuda" or (ck.HAVE_TRITON and selfcheck.kernel_ok(self.device, "moe")))
        return self._moe_kernels

    def _gate_up_half(self, e):
        """Where a resident gate or up expert tensor goes: its half of its layer's stacked gate|up
        (expert x: gate rows, then up rows: one kernel launch reads both), or None (not stacked)."""
        gate = "ffn_gate_exps" in e.name
        if not (gate or "ffn_up_exps" in e.name) or e.qtype not in mk.TYPES or not self._use_moe_kernels():
            return None
        gname = e.name.replace("ffn_up_exps", "ffn_gate_exps")
        other = gname if not gate else e.name.replace("ffn_gate_exps", "ffn_up_exps")
        o = self.residency[other] if other in self.residency else None
        if o is None or o.home != self.name or o.qtype != e.qtype or o.shape != e.shape:
            return None
        nb = e.expert_nbytes
        if gname not in self._gu:
            self._gu[gname] = torch.empty((e.n_expert, 2 * nb), dtype=torch.uint8, device=self.device)
        return self._gu[gname][:, :nb] if gate else self._gu[gname][:, nb:]

    def _load_experts(self, e) -> None:
        if e.home == self.name:
            t = self._gate_up_half(e)
            if t is None:
                t = torch.empty((e.n_expert, e.expert_nbytes), dtype=torch.uint8, device=self.device)
            for x in range(e.n_expert):
                t[x].copy_(self.rt.host_view(e.expert(x)))
            self._experts_dev[e.name] = t
            e.state = State.RESIDENT
        elif e.home == HOST and e.qtype in ck.SUPPORTED:
            self._host_experts.append(e.name)

    def _stack_experts(self) -> None:
        """After loading: the kernels' operands of every layer whose gate|up is stacked and down resident
        (the first path still reads the single names: views of the stack)."""
        for gname, gu in list(self._gu.items()):
            dname = gname.replace("ffn_gate_exps", "ffn_down_exps")
            g, d = self.residency[gname], self.residency[dname] if dname in self._experts_dev else None
            if d is None or d.qtype not in mk.TYPES:
                continue
            n_exp, ffn, dim = g.shape
            ws = [gu.view(n_exp * 2 * ffn, -1), self._experts_dev[dname].view(n_exp * d.shape[1], -1)]
            if self._repack_experts(g.qtype, d.qtype):  # int8 decode GEMVs (moe_q8.py); the same bytes
                ws = [repack(ws[0], g.qtype, n_exp * 2 * ffn, dim), repack(ws[1], d.qtype, n_exp * d.shape[1], d.shape[2])]
                for n in (gname, gname.replace("ffn_gate_exps", "ffn_up_exps"), dname):
                    self._experts_dev[n] = None  # (the blocks: only the path without kernels read them)
                del self._gu[gname]
            self._moe_w[gname] = (mk.Experts(g.qtype, n_exp, 2 * ffn, dim, ws[0]),
                                  mk.Experts(d.qtype, n_exp, d.shape[1], d.shape[2], ws[1]))

    def _repack_experts(self, *qtypes) -> bool:
        """Resident experts in repack.Packed rows where the Gluon GEMVs run (LSTREAM_MOE_REPACK=0: GGUF blocks)."""
        return (self.device.type == "cuda" and moe_q8.HAVE_GLUON and os.environ.get("LSTREAM_MOE_REPACK") != "0"
                and all(q in REPACK_TYPES for q in qtypes))

    @property
    def host_experts(self) -> list[str]:
        """The expert tensors in host memory that this device may upload (a policy tunes for them)."""
        return self._host_experts

    def offload_moe(self, node, n_tokens: int, residency) -> tuple[bool, str]:
        entry = residency[node.weight]
        if node.weight not in self._host_experts:
            return False, f"no GPU kernel for {entry.qtype.name} experts"
        pol = self.policy
        thr = f"expert threshold {pol.expert_threshold} tokens"
        if self.expert_cache_gib and is_small_batch(n_tokens) and self._cache_kernels(entry):
            return True, (f"--expert-cache {self.expert_cache_gib:g} GiB: routed first, the experts cached in VRAM "
                          f"computed here, the others on the CPU (then cached)")
        if pol.should_upload_expert(Op.MOE, entry, n_tokens, n_tokens):
            return True, (f"{pol.describe()}, {thr}: routed first, experts with enough of the {n_tokens} tokens "
                          f"uploaded, the others on the CPU")
        if pol.may_upload_experts(Op.MOE, entry, n_tokens):
            return True, (f"{pol.describe()}: routed first, the {pol.decode_experts} most routed experts "
                          f"uploaded while the CPU computes the others")
        return False, f"{pol.describe()}, {thr}: no expert reaches it at {n_tokens} tokens"

    def _expert_streamer(self):
        if self.expert_streamer is None:
            from ...core.expert_streaming import ExpertStreamer
            self.expert_streamer = ExpertStreamer(self.rt, self.residency, self._host_experts)
            if self.expert_cache_gib:
                from ...core.expert_cache import ExpertCache
                self._expert_cache = ExpertCache(self.rt, self.expert_streamer, int(self.expert_cache_gib * 2**30))
        return self.expert_streamer

    def share_experts(self, node, x, ids: np.ndarray, w: np.ndarray):
        """A host-expert decode hop's device share (core/replay.py): of one token's routed experts
        (ids, w: (1, top_k)), the last moe_share are copied from the pinned arena and computed here.
        Returns (mask of the pairs taken, their weighted sum on the device), or (None, None)."""
        k = ids.shape[1]
        n = min(self.moe_share or 0, k)  # (auto, < 0: off on this fallback path; hop_share.py's path shares)
        if n <= 0 or ids.shape[0] != 1 or self.expert_cache_gib or not self._use_moe_kernels():
            return None, None
        if self._share is None:
            from .expert_share import ExpertShare
            self._share = ExpertShare(self, self._expert_streamer(), k)
        if self._share.layer(node) is None:
            return None, None
        take = np.zeros(ids.shape, dtype=bool)
        take[0, k - n:] = True
        return take, self._share.run(node, x, ids[0, k - n:], w[0, k - n:])

    def _cache_kernels(self, entry) -> bool:
        """The cache's hits run on the decode kernels: gate and up of one type they read."""
        up = self.residency[entry.name.replace("ffn_gate_exps", "ffn_up_exps")] if "ffn_gate_exps" in entry.name \
            else None
        return (self._use_moe_kernels() and entry.qtype in mk.TYPES and up is not None and up.qtype == entry.qtype)

    @property
    def expert_cache(self):
        return self._expert_cache

    # -- compute -----------------------------------------------------------------------------------
    def _moe(self, node, inputs, ctx):
        x, logits = inputs[0], inputs[1]
        if node.weights[0] in self._experts_dev:
            y = self._moe_resident(node, x, logits)
        else:
            y = self._moe_streamed(node, x, logits, ctx)
        if len(inputs) > 2:  # Qwen2-MoE: + sigmoid(x . w_gate) * shared expert
            g = x.float() @ self._small[node.weights[3]]
            y = y + torch.sigmoid(g)[:, None] * inputs[2].float()
        return y

    def _deq(self, raw: torch.Tensor, name: str) -> torch.Tensor:
        e = self.residency[name]
        return ck.dequantize(raw, e.qtype, e.n_cols, dtype=self.dtype, use_triton=self.use_triton)

    def _ffn(self, names, xe: torch.Tensor, raws) -> torch.Tensor:
        """One expert's SwiGLU FFN on its tokens' rows: raws = its gate, up, down blocks."""
        xe = xe.to(self.dtype)
        g = xe @ self._deq(raws[0], names[0]).t()
        u = xe @ self._deq(raws[1], names[1]).t()
        h = (F.silu(g.float()) * u.float()).to(self.dtype)
        return (h @ self._deq(raws[2], names[2]).t()).float()

    def _moe_resident(self, node, x, logits):
        p, names = node.params, node.weights[:3]
        k, n_exp = p["top_k"], p["n_expert"]
        T = x.shape[0]
        kern = self._moe_w.get(names[0])
        ids, w = self._route_dev(logits, k, p["norm"], kern is not None)
        if kern is not None:
            if is_small_batch(T) or self.dtype == torch.float32:  # GEMVs (fp32: exact products, no int8 x)
                return mk.decode(x, ids, w, *kern, int8=self.dtype != torch.float32)
            return mk.prefill(x.to(self.dtype), ids, w, *kern)
        if is_small_batch(T):  # every (token, expert) pair: its blocks gathered by id, one batched product
            flat = ids.reshape(-1)
            mats = []
            for n in names:
                e, blk = self.residency[n], self._experts_dev[n][flat]
                mats.append(self._deq(blk, n).view(len(flat), e.shape[1], e.shape[2]))
            xp = x.to(self.dtype).repeat_interleave(k, dim=0)[:, :, None]
            g, u = torch.bmm(mats[0], xp)[..., 0], torch.bmm(mats[1], xp)[..., 0]
            h = (F.silu(g.float()) * u.float()).to(self.dtype)[:, :, None]
            y = torch.bmm(mats[2], h)[..., 0].float().view(T, k, -1)
            return (y * w[..., None]).sum(dim=1)
        ids_np, w_dev = ids.cpu().numpy(), w.reshape(-1)
        out = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=self.device)
        groups = group(ids_np, n_exp)
        for j, e in enumerate(groups.experts):
            pairs = groups.pairs[groups.starts[j]:groups.starts[j + 1]]
            tok = torch.as_tensor(pairs // k, device=self.device)
            y = self._ffn(names, x[tok], [self._experts_dev[n][e] for n in names])
            out.index_add_(0, tok, y * w_dev[torch.as_tensor(pairs, device=self.device)][:, None])
        return out

    def hop_route(self, node, logits):
        """A host-expert hop's routing on the device (core/hop_replay.py): (ids, weights) (T, top_k)."""
        return self._route_dev(logits, node.params["top_k"], node.params["norm"])

    def _route_dev(self, logits, k: int, norm: bool, kernel: bool = True):
        """core/moe.route on the device: (ids (T, k) int64, weights (T, k) fp32), no host sync: one
        launch (moe_kernels.route) where Triton runs, else torch's softmax and top-k."""
        if kernel and mk.use_kernels(logits) and self._use_moe_kernels():
            return mk.route(logits, k, norm)
        prob = torch.softmax(logits.double(), dim=-1)
        w, ids = torch.topk(prob, k, dim=-1)
        if norm:
            w = w / w.sum(dim=-1, keepdim=True)
        return ids, w.float()

    def _slot_experts(self, node, es) -> list:
        """The expert slot holding node's layer as the kernels' operands, one Experts per tensor (gate,
        up, down: the slot keeps them apart; the kernels read the acquired experts by id)."""
        lv = self.expert_streamer.layer_views(node.layer)
        return [mk.Experts(e.qtype, e.n_expert, e.shape[1], e.shape[2], lv[e.name].view(e.n_expert * e.shape[1], -1))
                for e in es]

    def _pairs_decode(self, ex, x, ids, w, mask, slot=None) -> torch.Tensor:
        """The (token, expert) pairs of a small step where `mask` is set, by the decode kernels over
        the experts `ex` (gate, up, down read apart; an expert id mapped by `slot` first): each pair as
        its own row (x repeated), summed back per token."""
        t, j = np.nonzero(mask)
        eid = ids[t, j] if slot is None else np.array([slot[int(i)] for i in ids[t, j]], dtype=np.int64)
        meta = torch.as_tensor(np.stack([t, eid]).astype(np.int64), device=self.device)
        wd = torch.as_tensor(w[t, j][:, None], device=self.device)
        y = mk.decode(x[meta[0]], meta[1][:, None], wd, ex[0], ex[2], up=ex[1])
        return torch.zeros((x.shape[0], y.shape[1]), dtype=torch.float32, device=self.device).index_add_(0, meta[0], y)

    def _cache_experts(self, node, es) -> list:
        """The expert cache's slots as the kernels' operands (gate, up, down), slot ids as expert ids."""
        c = self._expert_cache
        out = []
        for e in es:
            kind = next(k for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") if k in e.name)
            out.append(mk.Experts(e.qtype, c.n_slots, e.shape[1], e.shape[2],
                                  c.bufs[kind].view(c.n_slots * e.shape[1], -1)))
        return out

    def _moe_streamed(self, node, x, logits, ctx):
        """Experts in host memory: route, upload those the policy wants (copies start now), let the host
        backend compute the others meanwhile, then compute the uploaded ones here."""
        p, names = node.params, node.weights[:3]
        k, n_exp, T = p["top_k"], p["n_expert"], x.shape[0]
        entry = self.residency[names[0]]
        st = self._expert_streamer()
        es = [self.residency[n] for n in names]
        # the kernels read the slot's gate, up and down apart: gate and up of one type they know
        slot_kernels = self._use_moe_kernels() and es[0].qtype == es[1].qtype and all(e.qtype in mk.TYPES for e in es)
        if (not is_small_batch(T) and self.dtype != torch.float32 and mk.use_kernels(x) and slot_kernels
                and st.acquire_all(node.layer)):
            # a prompt's ubatch whose layer a prefetch brought whole: routed and computed on the device,
            # no host sync (the GPU keeps the queue; the copy stream the next layer's prefetch)
            st.prefetch_next(node.layer)
            ids_d, w_d = self._route_dev(logits, k, p["norm"])
            ex = self._slot_experts(node, es)
            out = mk.prefill(x.to(self.dtype), ids_d, w_d, ex[0], ex[2], up=ex[1])
            st.release(node.layer)
            if ctx.profile is not None:
                ctx.profile.add(f"{self.name} experts uploaded", 0.0, n_exp)
            return out
        if is_small_batch(T):
            ids, w = route(logits.float().cpu().numpy(), k, p["norm"])
        else:  # a prompt's ubatch: routed here (numpy's top-k over T x n_expert costs ms), ids read back
            ids_d, w_d = self._route_dev(logits, k, p["norm"])
            ids, w = ids_d.to(torch.int32).cpu().numpy(), w_d.cpu().numpy()
        cache = self._expert_cache if is_small_batch(T) and self._cache_kernels(entry) else None
        hits = cache.lookup(node.layer, np.unique(ids).tolist()) if cache is not None else {}
        up = [x for x in self.policy.experts_to_upload(Op.MOE, entry, expert_counts(ids, n_exp), T) if x not in hits]
        before = st.stats.bytes_streamed
        views = st.acquire(node.layer, up) if up else None
        if 4 * len(up) >= 3 * n_exp:  # a large ubatch: the next layer's experts are copied meanwhile
            st.prefetch_next(node.layer)
        on_dev = np.zeros(n_exp, dtype=bool)
        on_dev[up] = True
        cached = np.zeros(n_exp, dtype=bool)
        cached[list(hits)] = True
        host_pairs = ~(on_dev | cached)[ids]
        if cache is not None:  # this step's misses, for the next steps: copied while the CPU computes them
            cache.insert(node.layer, [x for x in np.unique(ids).tolist() if x not in hits], keep=set(hits.values()))
        out = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=self.device)
        prof = ctx.profile
        if host_pairs.any():
            t0 = time.perf_counter()
            y = self.host.moe_experts(node, x.float().cpu().numpy(), np.where(host_pairs, ids, -1), w)
            out += self.from_host(y)
            if prof is not None:
                prof.add("cpu experts (for the device)", time.perf_counter() - t0, int(np.unique(ids[host_pairs]).size))
        if hits:  # the cached experts here, read from their slots
            out += self._pairs_decode(self._cache_experts(node, es), x, ids, w, cached[ids], slot=hits)
            cache.release(hits.values())
        kernels = up and slot_kernels
        if kernels and (is_small_batch(T) or self.dtype == torch.float32):  # GEMVs over the slot's experts
            out += self._pairs_decode(self._slot_experts(node, es), x, ids, w, on_dev[ids])
        elif kernels:  # grouped GEMMs over the slot, experts by id
            ex = self._slot_experts(node, es)
            dev_ids = torch.as_tensor(np.where(on_dev[ids], ids, -1), device=self.device)
            out += mk.prefill(x.to(self.dtype), dev_ids, torch.as_tensor(w, device=self.device), ex[0], ex[2], up=ex[1])
        elif up:  # per uploaded expert: dequantize, multiply
            groups = group(ids, n_exp, keep=on_dev[ids])
            wflat = w.reshape(-1)
            for j, e in enumerate(groups.experts):
                pairs = groups.pairs[groups.starts[j]:groups.starts[j + 1]]
                tok = torch.as_tensor(pairs // k, device=self.device)
                y = self._ffn(names, x[tok], [views(int(e))[n] for n in names])
                out.index_add_(0, tok, y * torch.as_tensor(wflat[pairs], device=self.device)[:, None])
        if up:
            st.release(node.layer)
        if prof is not None:
            prof.bytes_uploaded += st.stats.bytes_streamed - before
            prof.add(f"{self.name} experts uploaded", 0.0, len(up))
            if cache is not None:
                prof.add("expert cache hits", 0.0, len(hits))
                prof.add("expert cache lookups", 0.0, int(np.unique(ids).size))
        return out
