"""Fused kernels of a decode step on the GPU (a step replays ~10 launches per layer, not ~22):

  add_rms_norm   the residual add and the RMS norm that reads it, in one pass
  act            SwiGLU / GEGLU of the (strided) gate|up halves, written in the compute dtype
  rope_store     RoPE of q and k, and k and v written into the K/V cache at each token's position
  attention      split-K flash decoding over the cache up to each token's position (read on the
                 device, so one captured graph serves every position: no span, no mask), then a
                 combine of the splits

All arithmetic in fp32; q.k and p.v go through tensor cores in bf16 (as flash attention does).
Without Triton (the CPU) each has a torch reference that computes the same function.
"""
from __future__ import annotations

import os

import torch

from .dequant import HAVE_TRITON, tl, triton, triton_usable
from .fast_launch import launcher  # (eager prompts launch act once per layer and ubatch)

N_SPLITS = 16  # key blocks per (token, kv head) in decode attention: ~1 wave of programs at 8 kv heads


def n_splits_for(n_ctx: int) -> int:
    """Splits for a cache of n_ctx rows: fixed per cache (one captured graph serves every position),
    growing with it so that a full cache leaves each program ~2 blocks of 32 keys. At depth 4096 with
    8 kv heads, 16 splits were 128 programs each walking 8 blocks one after another (latency-bound:
    +0.52 ms per token on the H200 against +0.22 for llama.cpp); 64 are 512 programs."""
    s = N_SPLITS
    while s < 64 and s * 64 < n_ctx:
        s *= 2
    return s

if HAVE_TRITON:

    @triton.jit
    def _k_add_norm(x_ptr, h_ptr, s_ptr, w_ptr, y_ptr, N, H_STRIDE, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < N
        s = tl.load(x_ptr + row * N + c, mask=m, other=0.0).to(tl.float32) \
            + tl.load(h_ptr + row * H_STRIDE + c, mask=m, other=0.0).to(tl.float32)
        tl.store(s_ptr + row * N + c, s, mask=m)
        r = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
        w = tl.load(w_ptr + c, mask=m, other=0.0)
        tl.store(y_ptr + row * N + c, (s * r * w).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _k_act(g_ptr, u_ptr, y_ptr, F, G_STRIDE, U_STRIDE, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < F
        g = tl.load(g_ptr + row * G_STRIDE + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * U_STRIDE + c, mask=m, other=0.0).to(tl.float32)
        if GELU:  # tanh approximation, as gelu_pytorch_tanh: 0.5 g (1 + tanh(k0 (g + k1 g^3)))
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * z)))
        else:
            a = g / (1.0 + tl.exp(-g))
        tl.store(y_ptr + row * F + c, (a * u).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_rows(base, cos_ptr, sin_ptr, t, HALF, mask, HD: tl.constexpr, BD: tl.constexpr,
                   N_ROT: tl.constexpr, NEOX: tl.constexpr):
        """RoPE of the rows at base[r] + d (d < HD, BD its power of two) of token t, [R, BD] fp32."""
        d = tl.arange(0, BD)
        dm = d < HD
        if NEOX:
            i = tl.where(d < HALF, d, d - HALF)
            partner = tl.where(d < HALF, d + HALF, d - HALF)
            sign = tl.where(d < HALF, -1.0, 1.0)
        else:
            i = d // 2
            partner = d ^ 1
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
        rot = (d < N_ROT) & dm
        c = tl.load(cos_ptr + t * HALF + i, mask=rot, other=1.0)
        s = tl.load(sin_ptr + t * HALF + i, mask=rot, other=0.0)
        x = tl.load(base[:, None] + d[None, :], mask=mask[:, None] & dm[None, :], other=0.0).to(tl.float32)
        xp = tl.load(base[:, None] + partner[None, :], mask=mask[:, None] & rot[None, :], other=0.0).to(tl.float32)
        return tl.where(rot[None, :], x * c[None, :] + sign[None, :] * xp * s[None, :], x)

    @triton.jit
    def _k_rope_store(q_ptr, k_ptr, v_ptr, Q_STRIDE, K_STRIDE, V_STRIDE, cos_ptr, sin_ptr, pos_ptr,
                      qo_ptr, kc_ptr, vc_ptr, n_head, n_kv, HALF,
                      HD: tl.constexpr, N_ROT: tl.constexpr, NEOX: tl.constexpr, BD: tl.constexpr):
        """Program (t, h): h < n_head rotates q head h into qo (fp32); else kv head h - n_head:
        k rotated and v copied into the caches at row pos[t]."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        one = tl.zeros([1], tl.int64)
        d = one[:, None] + tl.arange(0, BD)[None, :]  # [1, BD]
        dm = d < HD
        if h < n_head:
            src = q_ptr + t * Q_STRIDE + h * HD
        else:
            src = k_ptr + t * K_STRIDE + (h - n_head) * HD
        y = _rope_rows(src + one, cos_ptr, sin_ptr, t, HALF, one == 0, HD, BD, N_ROT, NEOX)
        if h < n_head:
            tl.store(qo_ptr + (t * n_head + h) * HD + d, y, mask=dm)
        else:
            j = h - n_head
            row = tl.load(pos_ptr + t).to(tl.int64) * n_kv + j
            tl.store(kc_ptr + row * HD + d, y.to(kc_ptr.dtype.element_ty), mask=dm)
            v = tl.load(v_ptr + t * V_STRIDE + j * HD + d, mask=dm, other=0.0)
            tl.store(vc_ptr + row * HD + d, v.to(vc_ptr.dtype.element_ty), mask=dm)

    @triton.jit
    def _k_attn_split(q_ptr, kc_ptr, vc_ptr, pos_ptr, po_ptr, pm_ptr, pl_ptr, cnt_ptr, out_ptr, scale, window,
                      n_head, n_kv, k_ptr, v_ptr, Q_STRIDE, K_STRIDE, V_STRIDE, cos_ptr, sin_ptr, HALF,
                      G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BN: tl.constexpr,
                      NS: tl.constexpr, BF16_DOT: tl.constexpr, FUSED: tl.constexpr, ROPE: tl.constexpr,
                      N_ROT: tl.constexpr, NEOX: tl.constexpr):
        """Program (kv head, split, t): the G query heads of one kv head over one split of the
        keys [lo, pos_t]; writes the split's running max, sum and unnormalized output. The dots
        take bf16 on a GPU; fp32 in the interpreter (which multiplies bf16 bit patterns).
        FUSED: the last of the NS programs of (t, kv head) to finish (a counter) combines their
        heads' splits into out and zeroes the counter: no second launch.
        ROPE (one token per launch): q is the raw projection (rows Q_STRIDE apart), rotated here;
        the program whose split holds pos_t rotates k and writes k and v into the caches first
        (rope_store's work without its launch: no other program reads that row)."""
        DT: tl.constexpr = tl.bfloat16 if BF16_DOT else tl.float32
        kvh = tl.program_id(0)
        sp = tl.program_id(1)
        t = tl.program_id(2).to(tl.int64)
        p = tl.load(pos_ptr + t).to(tl.int32)
        lo = tl.where(window > 0, tl.maximum(p - window + 1, 0), 0)
        n = p + 1 - lo
        chunk = tl.cdiv(tl.cdiv(n, NS), BN) * BN
        start = lo + sp * chunk
        end = tl.minimum(start + chunk, p + 1)
        g = tl.arange(0, GP)
        d = tl.arange(0, HD)
        gm = g < G
        heads = kvh * G + g
        if ROPE:
            q = _rope_rows(q_ptr + t * Q_STRIDE + heads * HD, cos_ptr, sin_ptr, t, HALF, gm, HD, HD, N_ROT, NEOX)
            if (p >= start) & (p < end):
                one = tl.zeros([1], tl.int64)
                kr = _rope_rows(k_ptr + t * K_STRIDE + kvh * HD + one, cos_ptr, sin_ptr, t, HALF, one == 0, HD, HD,
                                N_ROT, NEOX)
                row = (p.to(tl.int64) * n_kv + kvh) * HD + one[:, None] + d[None, :]
                tl.store(kc_ptr + row, kr.to(kc_ptr.dtype.element_ty))
                vr = tl.load(v_ptr + t * V_STRIDE + kvh * HD + one[:, None] + d[None, :])
                tl.store(vc_ptr + row, vr.to(vc_ptr.dtype.element_ty))
                tl.debug_barrier()  # the row is read back below by this program's other threads
        else:
            q = tl.load(q_ptr + (t * n_head + heads[:, None]) * HD + d[None, :], mask=gm[:, None], other=0.0)
        q = (q * scale).to(DT)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HD], tl.float32)
        kb = start
        while kb < end:  # (a while loop: runtime bounds, also in the Triton interpreter)
            kidx = kb + tl.arange(0, BN)
            km = kidx < end
            off = (kidx.to(tl.int64)[:, None] * n_kv + kvh) * HD + d[None, :]
            kt = tl.load(kc_ptr + off, mask=km[:, None], other=0.0).to(DT)
            sc = tl.dot(q, tl.trans(kt))  # [GP, BN] fp32
            sc = tl.where(km[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            vt = tl.load(vc_ptr + off, mask=km[:, None], other=0.0).to(DT)
            acc = acc * alpha[:, None] + tl.dot(pr.to(DT), vt)
            m_i = m_new
            kb += BN
        slot = (t * n_head + heads) * NS + sp
        tl.store(pm_ptr + slot, m_i, mask=gm)
        tl.store(pl_ptr + slot, l_i, mask=gm)
        tl.store(po_ptr + slot[:, None] * HD + d[None, :], acc, mask=gm[:, None])
        if FUSED:
            tl.debug_barrier()  # every thread's partials stored before the release below
            done = tl.atomic_add(cnt_ptr + t * n_kv + kvh, 1, sem="acq_rel")
            if done == NS - 1:
                for gi in range(G):
                    _combine(po_ptr, pm_ptr, pl_ptr, out_ptr, t, kvh * G + gi, n_head, HD, NS)
                tl.store(cnt_ptr + t * n_kv + kvh, 0)  # ready for the next launch (a graph's replay)

    @triton.jit
    def _combine(po_ptr, pm_ptr, pl_ptr, out_ptr, t, h, n_head, HD: tl.constexpr, NS: tl.constexpr):
        """Head h of token t: its NS splits' partials merged (loads past L1: other programs wrote them)."""
        s = tl.arange(0, NS)
        d = tl.arange(0, HD)
        base = (t * n_head + h) * NS
        m = tl.load(pm_ptr + base + s, cache_modifier=".cg")
        l_ = tl.load(pl_ptr + base + s, cache_modifier=".cg")
        mx = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
        o = tl.load(po_ptr + (base + s)[:, None] * HD + d[None, :], cache_modifier=".cg")
        y = tl.sum(o * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
        tl.store(out_ptr + (t * n_head + h) * HD + d, y.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _k_attn_combine(po_ptr, pm_ptr, pl_ptr, out_ptr, n_head, HD: tl.constexpr, NS: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        s = tl.arange(0, NS)
        d = tl.arange(0, HD)
        base = (t * n_head + h) * NS
        m = tl.load(pm_ptr + base + s)
        l_ = tl.load(pl_ptr + base + s)
        mx = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
        o = tl.load(po_ptr + (base + s)[:, None] * HD + d[None, :])
        y = tl.sum(o * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
        tl.store(out_ptr + (t * n_head + h) * HD + d, y.to(out_ptr.dtype.element_ty))


def _rows(x: torch.Tensor) -> int:
    """Row stride of a 2-D activation whose rows are contiguous (a column slice of a stacked output)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected a 2-D tensor with contiguous rows, found shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    return x.stride(0)


def _use(t: torch.Tensor, use_triton: bool | None) -> bool:
    return triton_usable(t) if use_triton is None else use_triton and HAVE_TRITON


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, eps: float, dtype: torch.dtype,
                 use_triton: bool | None = None):
    """s = x + h (fp32, the new residual), y = rms_norm(s) * w in `dtype`. x: (T, N) fp32 contiguous."""
    n = x.shape[-1]
    if _use(x, use_triton) and x.is_contiguous():
        s = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        y = torch.empty(x.shape, dtype=dtype, device=x.device)
        _k_add_norm[(x.shape[0],)](x, h, s, w, y, n, _rows(h), eps, BLOCK=triton.next_power_of_2(n),
                                    num_warps=8 if n >= 4096 else 4)
        return s, y
    s = x.float() + h.float()
    return s, (s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps) * w).to(dtype)


def act(g: torch.Tensor, u: torch.Tensor, gelu: bool, dtype: torch.dtype, use_triton: bool | None = None) -> torch.Tensor:
    """silu(g) * u (or gelu_tanh(g) * u) in `dtype`; g, u: (T, F) with contiguous rows."""
    t, f = g.shape
    if _use(g, use_triton):
        y = torch.empty((t, f), dtype=dtype, device=g.device)
        block = 1024
        launcher(_k_act)((t, triton.cdiv(f, block)), g, u, y, f, _rows(g), _rows(u), GELU=gelu, BLOCK=block,
                         num_warps=4)
        return y
    gf = g.float()
    a = torch.nn.functional.gelu(gf, approximate="tanh") if gelu else torch.nn.functional.silu(gf)
    return (a * u.float()).to(dtype)


def rope_store(q, k, v, cos, sin, positions, k_cache, v_cache, n_head: int, n_kv: int, head_dim: int,
               n_rot: int, neox: bool, use_triton: bool | None = None) -> torch.Tensor:
    """RoPE on q and k, k and v written into the caches (n_ctx, n_kv, head_dim) at rows
    positions (T,) int64 (on the device). Returns the rotated q as (T, n_head, head_dim) fp32."""
    t = q.shape[0]
    qo = torch.empty((t, n_head, head_dim), dtype=torch.float32, device=q.device)
    k = k if k.dtype == q.dtype else k.to(q.dtype)  # one source type for the kernel's two branches
    if _use(q, use_triton):
        _k_rope_store[(t, n_head + n_kv)](q, k, v, _rows(q), _rows(k), _rows(v), cos, sin, positions, qo,
                                          k_cache, v_cache, n_head, n_kv, n_rot // 2, HD=head_dim, N_ROT=n_rot,
                                          NEOX=bool(neox), BD=triton.next_power_of_2(head_dim), num_warps=1)
        return qo
    from .norm_rope import rope
    qo.copy_(rope(q, cos, sin, n_head, head_dim, n_rot, neox, torch.float32, False).view(t, n_head, head_dim))
    kr = rope(k, cos, sin, n_kv, head_dim, n_rot, neox, torch.float32, False).view(t, n_kv, head_dim)
    k_cache.index_copy_(0, positions, kr.to(k_cache.dtype))
    v_cache.index_copy_(0, positions, v.reshape(t, n_kv, head_dim).to(v_cache.dtype))
    return qo


def attention(qo, k_cache, v_cache, positions, scale: float, window: int, n_head: int, n_kv: int,
              dtype: torch.dtype, n_splits: int | None = None, use_triton: bool | None = None, rope=None,
              q_shape=None) -> torch.Tensor:
    """Causal GQA of qo (T, n_head, hd) fp32 at positions (T,) over the cache rows [lo, pos_t]
    (lo = pos_t - window + 1 for a sliding layer). Returns (T, n_head * hd) in `dtype`.
    rope = (k, v, (cos, sin), n_rot, neox): qo is the raw q (T, n_head * hd) with q_shape the
    rotated one's, see rope_attention."""
    t, _, hd = q_shape or qo.shape
    if rope:
        k, v, (cos, sin), n_rot, _ = rope
        rope_args = (k, v, _rows(qo), _rows(k), _rows(v), cos, sin, n_rot // 2)
    else:
        rope_args = (qo, qo, 0, 0, 0, qo, qo, 0)
    n_splits = n_splits or n_splits_for(k_cache.shape[0])
    g = n_head // n_kv
    if _use(qo, use_triton) and hd >= 16 and hd == triton.next_power_of_2(hd):
        po = torch.empty((t, n_head, n_splits, hd), dtype=torch.float32, device=qo.device)
        pm = torch.empty((t, n_head, n_splits), dtype=torch.float32, device=qo.device)
        pl = torch.empty_like(pm)
        out = torch.empty((t, n_head * hd), dtype=dtype, device=qo.device)
        # opt-in: with the fused FFN activation it measured slower on the H200 (tools/gpu_notes.md)
        fused = os.environ.get("LSTREAM_ATTN_FUSED") == "1" and t * n_kv <= N_COUNTERS
        cnt = _counters(qo.device) if fused else pm
        _k_attn_split[(n_kv, n_splits, t)](qo, k_cache, v_cache, positions, po, pm, pl, cnt, out, scale,
                                            int(window or 0), n_head, n_kv, *rope_args, G=g,
                                            GP=max(16, triton.next_power_of_2(g)), HD=hd, BN=32, NS=n_splits,
                                            BF16_DOT=qo.is_cuda, FUSED=fused, ROPE=bool(rope), N_ROT=rope[3] if rope
                                            else hd, NEOX=bool(rope and rope[4]), num_warps=4)
        if not fused:
            _k_attn_combine[(t, n_head)](po, pm, pl, out, n_head, HD=hd, NS=n_splits, num_warps=4)
        return out
    return attention_reference(qo, k_cache, v_cache, positions, scale, window, n_kv).to(dtype)


def rope_attention(q, k, v, cos, sin, positions, k_cache, v_cache, scale: float, window: int, n_head: int,
                   n_kv: int, head_dim: int, n_rot: int, neox: bool, dtype: torch.dtype,
                   use_triton: bool | None = None) -> torch.Tensor | None:
    """rope_store + attention of ONE token, RoPE and the cache write inside the split launch (one
    launch fewer per layer); None where it does not apply (several tokens: a token reads the
    K/V rows the others write, which only a separate launch orders; no Triton; LSTREAM_ROPE_ATTN=0)."""
    if q.shape[0] != 1 or not _use(q, use_triton) or head_dim < 16 or head_dim != triton.next_power_of_2(head_dim) \
            or os.environ.get("LSTREAM_ROPE_ATTN") == "0" or k.dtype != q.dtype:
        return None
    shape = (1, n_head, head_dim)
    return attention(q, k_cache, v_cache, positions, scale, window, n_head, n_kv, dtype, use_triton=use_triton,
                     rope=(k, v, (cos, sin), n_rot, neox), q_shape=shape)


_COUNTERS: dict = {}
N_COUNTERS = 4096  # (token, kv head) pairs a fused launch may count: a decode step's few tokens


def _counters(device) -> torch.Tensor:
    """Zeroed int32 counters of the fused attention (each launch leaves them zero again): one fixed
    buffer per device, never replaced (captured graphs keep its address)."""
    c = _COUNTERS.get(device)
    if c is None:
        c = _COUNTERS[device] = torch.zeros(N_COUNTERS, dtype=torch.int32, device=device)
    return c


def attention_reference(qo, k_cache, v_cache, positions, scale: float, window: int, n_kv: int) -> torch.Tensor:
    """The same function in plain torch, token by token (tests and the CPU fallback)."""
    t, n_head, hd = qo.shape
    g = n_head // n_kv
    outs = []
    for i in range(t):
        p = int(positions[i])
        lo = max(p - int(window) + 1, 0) if window else 0
        keys = k_cache[lo:p + 1].float().repeat_interleave(g, dim=1)  # (S, n_head, hd)
        vals = v_cache[lo:p + 1].float().repeat_interleave(g, dim=1)
        s = torch.einsum("hd,shd->hs", qo[i].float(), keys) * scale
        outs.append(torch.einsum("hs,shd->hd", torch.softmax(s, dim=-1), vals).reshape(-1))
    return torch.stack(outs)
