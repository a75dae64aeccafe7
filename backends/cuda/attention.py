"""Attention on the CUDA backend: K/V in VRAM for resident layers; for a host layer computed here
(prefill), its past read from host memory and its new K/V written back asynchronously; and the
static form of a decode step (core/replay.py, graphs.py). A mixin of CUDABackend."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.batch import is_small_batch
from ...core.graph import Node
from . import decode_kernels as dk
from .prefill_attention import prefill_attention, supported


@dataclass
class DeviceKV:
    k: torch.Tensor  # (n_ctx, n_kv_head, head_dim) compute dtype, on the device
    v: torch.Tensor


class AttentionMixin:
    def _attention(self, node: Node, inputs, ctx) -> torch.Tensor:
        q, k, v = inputs
        p = node.params
        t, n_past = q.shape[0], ctx.n_past
        n_head, n_kv, hd = p["n_head"], p["n_head_kv"], p["head_dim"]
        k = k.to(self.dtype).reshape(t, n_kv, hd)
        v = v.to(self.dtype).reshape(t, n_kv, hd)
        store = self.kv_store(ctx, node.layer)
        if ctx.graph is not None:
            return self._attention_static(q, k, v, store, p, ctx.graph)
        if isinstance(store, DeviceKV):  # resident layer: K/V live here
            store.k[n_past:n_past + t] = k
            store.v[n_past:n_past + t] = v
            keys, vals = store.k[:n_past + t], store.v[:n_past + t]
        else:  # a host layer computed here (prefill): read its past, write the new K/V back async
            keys, vals = k, v
            pending = self._kv_done.get(id(store))
            if pending is not None:  # an earlier ubatch's write-back of this layer must land first
                self.rt.compute_stream.wait_event(pending)
            if n_past:
                pk = torch.from_numpy(store.k[:n_past]).to(self.device, non_blocking=True).to(self.dtype)
                pv = torch.from_numpy(store.v[:n_past]).to(self.device, non_blocking=True).to(self.dtype)
                keys, vals = torch.cat([pk, k]), torch.cat([pv, v])
            self._write_back(store, k, v, n_past)
        if self.prefill_attn and not is_small_batch(t) and supported(hd):  # no mask or repeated K/V heads
            pos = self._ubatch_positions(n_past, t)
            return prefill_attention(q, keys, vals, pos, p["scale"], p.get("window", 0) or 0, n_head, n_kv,
                                     self.dtype, use_triton=self.use_triton)
        s = n_past + t
        qh = q.to(self.dtype).reshape(t, n_head, hd).transpose(0, 1).unsqueeze(0)
        g = n_head // n_kv
        kh = keys.transpose(0, 1).unsqueeze(0)
        vh = vals.transpose(0, 1).unsqueeze(0)
        if g > 1:
            kh, vh = kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1)
        window = p.get("window", 0)
        mask, causal = None, False
        if window or (n_past and t > 1):
            qpos = torch.arange(n_past, s, device=self.device)[:, None]
            kpos = torch.arange(s, device=self.device)[None, :]
            mask = kpos <= qpos
            if window:
                mask &= kpos > qpos - window
        elif t > 1:
            causal = True
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, scale=p["scale"])
        return o.squeeze(0).transpose(0, 1).reshape(t, n_head * hd)

    @staticmethod
    def kv_store(ctx, layer: int):
        """The K/V cache attention reads at `layer`: in a layer-major prompt's static form a device
        stand-in for a host layer's (host_kv_scratch), else the context's own."""
        if ctx.graph is not None and ctx.graph.kv:
            store = ctx.graph.kv.get(layer)
            if store is not None:
                return store
        return ctx.kv.layers[layer]

    def host_kv_scratch(self, store, n0: int, rows: int) -> DeviceKV:
        """A device stand-in for a host layer's K/V in a layer-major prompt run in static form (core/
        layer_replay.py): its first n0 rows (the cache before the prompt) uploaded, the prompt's rows
        (up to `rows` in all) written there by the layer's ubatches and sent back by host_kv_done.
        One per head shape serves every layer in turn (a layer finishes all its ubatches before the
        next starts); sized to the prompts met (powers of two), not to the context: a model that does
        not fit keeps its VRAM for weights. Growing it bumps scratch_gen (graphs that wrote the old one
        are stale)."""
        shape = tuple(store.k.shape[1:])
        s = self._kv_scratch.get(shape)
        if s is None or s.k.shape[0] < rows:
            n = min(store.k.shape[0], max(1024, 1 << (rows - 1).bit_length()))
            z = lambda: torch.zeros((n,) + shape, dtype=self.dtype, device=self.device)  # noqa: E731
            s = self._kv_scratch[shape] = DeviceKV(z(), z())
            self.scratch_gen += 1
        if n0:
            pending = self._kv_done.get(id(store))
            if pending is not None:  # the host rows must have landed before they are read
                self.rt.compute_stream.wait_event(pending)
            for dst, src in ((s.k, store.k), (s.v, store.v)):
                dst[:n0].copy_(torch.from_numpy(src[:n0]).to(self.device, non_blocking=True))
        return s

    def host_kv_done(self, store, s: DeviceKV, n0: int, t: int) -> None:
        """The prompt's t rows of a host layer, from its scratch back to host memory (async, K/V
        stream); copied out first, so the next layer may refill the scratch at once."""
        self._write_back(store, s.k[n0:n0 + t].to(torch.float32, copy=True),
                         s.v[n0:n0 + t].to(torch.float32, copy=True), n0)

    def _ubatch_positions(self, n_past: int, t: int) -> torch.Tensor:
        """A ubatch's positions on the device, made once for all its layers."""
        hit = self._positions
        if hit is None or hit[0] != (n_past, t):
            hit = self._positions = ((n_past, t), torch.arange(n_past, n_past + t, device=self.device))
        return hit[1]

    def _attention_static(self, q, k, v, store: DeviceKV, p: dict, si) -> torch.Tensor:
        """Attention of a static step (core/replay.py, graphs.py): K/V written at the device-side
        positions, then split-K decode attention up to each token's position, read on the device
        (decode_kernels.attention), or for a prefill ubatch flash attention that reads them the same
        way (prefill_attention.py): one captured graph serves every position."""
        t, n_head, n_kv, hd = q.shape[0], p["n_head"], p["n_head_kv"], p["head_dim"]
        store.k.index_copy_(0, si.positions, k)
        store.v.index_copy_(0, si.positions, v)
        window = p.get("window", 0) or 0
        if self.decode_kernels and not is_small_batch(t):  # a prefill ubatch: tensor-core flash attention
            return prefill_attention(q, store.k, store.v, si.positions, p["scale"], window, n_head, n_kv, self.dtype,
                                     use_triton=self.use_triton)
        if self.decode_kernels:
            qo = q.float().reshape(t, n_head, hd)
            return dk.attention(qo, store.k, store.v, si.positions, p["scale"], window, n_head, n_kv,
                                self.dtype, use_triton=self.use_triton)
        # fallback (the split-K kernel failed its self-check): SDPA over the whole cache, masked by
        # position (built once per step); grouped heads share a K/V head by reshaping q
        g, n_ctx = n_head // n_kv, store.k.shape[0]
        mask = si.cache.get(("mask", g, window))
        if mask is None:
            kpos, qpos = torch.arange(n_ctx, device=self.device)[None, :], si.positions[:, None]
            m = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
            mask = si.cache[("mask", g, window)] = m.repeat(g, 1)[None, None]  # (1, 1, g*t, n_ctx)
        qh = q.to(self.dtype).reshape(t, n_kv, g, hd).permute(1, 2, 0, 3).reshape(1, n_kv, g * t, hd)
        o = F.scaled_dot_product_attention(qh, store.k.transpose(0, 1).unsqueeze(0), store.v.transpose(0, 1).unsqueeze(0),
                                           attn_mask=mask, scale=p["scale"])
        return o.reshape(n_kv, g, t, hd).permute(2, 0, 1, 3).reshape(t, n_head * hd)

    def _write_back(self, store, k: torch.Tensor, v: torch.Tensor, n_past: int) -> None:
        """New K/V of a host layer go back to its host cache on the K/V stream, without blocking."""
        rt, t = self.rt, k.shape[0]
        kf, vf = k.float(), v.float()
        ev = rt.new_event()
        ev.record(rt.compute_stream)
        rt.kv_stream.wait_event(ev)
        self._pin_host_kv(store)
        for arr, src in ((store.k, kf), (store.v, vf)):
            rt.copy(torch.from_numpy(arr)[n_past:n_past + t], src, rt.kv_stream)
        done = rt.new_event()
        done.record(rt.kv_stream)
        # keep the sources alive until their copies finished; drop the finished ones (VRAM flat)
        self._kv_pending = [x for x in self._kv_pending if not x[0].query()]
        self._kv_pending.append((done, kf, vf))
        self._kv_done[id(store)] = done

    def _pin_host_kv(self, store) -> None:
        """Move a host layer's K/V arrays into pinned memory once (same shape, same contents), so
        the device writes into them asynchronously; the CPU backend keeps reading store.k/.v."""
        if id(store) in self._pinned_kv:
            return
        self._pinned_kv.add(id(store))
        for attr in ("k", "v"):
            a = getattr(store, attr)
            buf, pinned = self.rt.alloc_host(a.nbytes)
            if not pinned:
                warnings.warn("host K/V could not be pinned: its write-back is synchronous", RuntimeWarning,
                              stacklevel=3)
                return
            arr = self.rt.as_array(buf, like=a)
            arr[...] = a
            setattr(store, attr, arr)

