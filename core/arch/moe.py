"""The feed-forward part of a block, dense or mixture of experts, for the llama-family builders.

A MoE layer (the file has blk.N.ffn_gate_inp.weight, the router) becomes
    router   MATMUL ffn_gate_inp -> logits (T, n_expert)       placed with the attention weights
    [shared  Qwen2-MoE's shared expert: gate/up/SwiGLU/down MATMULs, gated by ffn_gate_inp_shexp]
    moe      MOE (x, logits[, shared]) over ffn_{gate,up,down}_exps (3-D: one matrix per expert)
so the router runs where the layer's attention runs, and the experts where their weights live
(--cpu-moe: the CPU) unless the device's upload policy takes them, expert by expert.
"""
from __future__ import annotations

from ..config import ModelConfig
from ..graph import Graph
from ..ops import Op


def is_moe_layer(il: int, names: set[str]) -> bool:
    return f"blk.{il}.ffn_gate_inp.weight" in names


def ffn_block(g: Graph, cfg: ModelConfig, il: int, h: int, names: set[str]) -> int:
    """The FFN of layer il on the normed input h: SwiGLU, or the experts' where the layer has a router."""
    p = f"blk.{il}."
    if not is_moe_layer(il, names):
        gate = g.add(Op.MATMUL, f"{p}gate", (h,), il, (p + "ffn_gate.weight",))
        up = g.add(Op.MATMUL, f"{p}up", (h,), il, (p + "ffn_up.weight",))
        a = g.add(Op.SWIGLU, f"{p}swiglu", (gate, up), il)
        return g.add(Op.MATMUL, f"{p}down", (a,), il, (p + "ffn_down.weight",))
    if not cfg.n_expert or not cfg.n_expert_used:
        raise ValueError(f"{cfg.arch}: layer {il} has a router but the config gives no expert counts")
    logits = g.add(Op.MATMUL, f"{p}router", (h,), il, (p + "ffn_gate_inp.weight",))
    inputs, weights = (h, logits), [p + f"{k}.weight" for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")]
    if p + "ffn_gate_shexp.weight" in names:  # Qwen2-MoE: a shared expert every token passes through
        gate = g.add(Op.MATMUL, f"{p}gate_shexp", (h,), il, (p + "ffn_gate_shexp.weight",))
        up = g.add(Op.MATMUL, f"{p}up_shexp", (h,), il, (p + "ffn_up_shexp.weight",))
        a = g.add(Op.SWIGLU, f"{p}swiglu_shexp", (gate, up), il)
        inputs += (g.add(Op.MATMUL, f"{p}down_shexp", (a,), il, (p + "ffn_down_shexp.weight",)),)
        weights.append(p + "ffn_gate_inp_shexp.weight")  # a vector: sigmoid(x . w) scales the shared output
    return g.add(Op.MOE, f"{p}moe", inputs, il, tuple(weights), n_expert=cfg.n_expert, top_k=cfg.n_expert_used,
                 norm=bool(cfg.expert_norm), n_ff=cfg.n_ff_exp or cfg.n_ff)
