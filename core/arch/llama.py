"""Llama-family graph (Llama 2/3, Mistral, SmolLM, Qwen2 with q/k/v biases, Qwen3 with q/k norms;
Mixtral, Qwen3-MoE and Qwen2-MoE with experts in place of the FFN).
`attention_block` and `output_head` are shared by the other architectures (gemma3)."""
from __future__ import annotations

from ..config import ModelConfig
from ..graph import INPUT, Graph
from ..ops import Op
from .moe import ffn_block


def _opt(name: str, names: set[str]) -> str | None:
    return name if name in names else None


def attention_block(g: Graph, cfg: ModelConfig, il: int, x: int, names: set[str], **attn) -> int:
    """q/k/v projections (+ biases), per-head q/k RMS norms where the file has them (Qwen3,
    Gemma 3), RoPE, causal GQA over the cache (attn: rope_base, scale, window), output projection."""
    p = f"blk.{il}."
    q = g.add(Op.MATMUL, f"{p}q", (x,), il, (p + "attn_q.weight", _opt(p + "attn_q.bias", names)))
    k = g.add(Op.MATMUL, f"{p}k", (x,), il, (p + "attn_k.weight", _opt(p + "attn_k.bias", names)))
    v = g.add(Op.MATMUL, f"{p}v", (x,), il, (p + "attn_v.weight", _opt(p + "attn_v.bias", names)))
    if p + "attn_q_norm.weight" in names:
        q = g.add(Op.RMS_NORM_HEADS, f"{p}q_norm", (q,), il, (p + "attn_q_norm.weight",), eps=cfg.rms_eps,
                  head_dim=cfg.head_dim)
    if p + "attn_k_norm.weight" in names:
        k = g.add(Op.RMS_NORM_HEADS, f"{p}k_norm", (k,), il, (p + "attn_k_norm.weight",), eps=cfg.rms_eps,
                  head_dim=cfg.head_dim)
    rope = dict(n_head=cfg.n_head, head_dim=cfg.head_dim, n_rot=cfg.rope_dim, base=attn.pop("rope_base", cfg.rope_base),
                mode=cfg.rope_mode, scaling=attn.pop("rope_scaling", cfg.rope_scaling))
    q = g.add(Op.ROPE, f"{p}q_rope", (q,), il, **rope)
    k = g.add(Op.ROPE, f"{p}k_rope", (k,), il, **{**rope, "n_head": cfg.n_head_kv})
    a = g.add(Op.ATTENTION, f"{p}attn", (q, k, v), il, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv,
              head_dim=cfg.head_dim, scale=attn.pop("scale", cfg.head_dim ** -0.5), **attn)
    return g.add(Op.MATMUL, f"{p}o", (a,), il, (p + "attn_output.weight", _opt(p + "attn_output.bias", names)))


def output_head(g: Graph, cfg: ModelConfig, x: int, names: set[str]) -> int:
    n = cfg.n_layer
    # select_output: when only the last token's logits are wanted, drop the other rows here.
    x = g.add(Op.RMS_NORM, "output_norm", (x,), n, ("output_norm.weight",), eps=cfg.rms_eps, select_output=True)
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    return g.add(Op.MATMUL, "output", (x,), n, (head,))


def build(cfg: ModelConfig, names: set[str]) -> Graph:
    g = Graph(cfg.n_layer)
    x = g.add(Op.EMBED, "token_embd", (INPUT,), -1, ("token_embd.weight",))
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        h = g.add(Op.RMS_NORM, f"{p}attn_norm", (x,), il, (p + "attn_norm.weight",), eps=cfg.rms_eps)
        h = attention_block(g, cfg, il, h, names)
        x = g.add(Op.ADD, f"{p}attn_residual", (x, h), il)
        h = g.add(Op.RMS_NORM, f"{p}ffn_norm", (x,), il, (p + "ffn_norm.weight",), eps=cfg.rms_eps)
        h = ffn_block(g, cfg, il, h, names)  # SwiGLU, or experts (Mixtral, Qwen MoE: core/arch/moe.py)
        x = g.add(Op.ADD, f"{p}ffn_residual", (x, h), il)
    g.output = output_head(g, cfg, x, names)
    return g
