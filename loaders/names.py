"""One canonical tensor naming (GGUF's blk.N.* scheme) for every loader."""
from __future__ import annotations

import re

# Hugging Face suffix -> GGUF suffix, per block (model.layers.N.<hf> -> blk.N.<gguf>).
HF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm",
    # mixtures of experts: the router, Qwen2-MoE's shared expert and its gate (per-expert tensors: EXPERT)
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Gemma 3 puts a norm after attention and another before the FFN.
HF_BLOCK_GEMMA3 = {**HF_BLOCK, "post_attention_layernorm": "post_attention_norm"}

HF_GLOBAL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}

# One expert's matrix (Qwen-MoE mlp.experts.E.*_proj; Mixtral block_sparse_moe.experts.E.w1/w3/w2) -> the
# 3-D GGUF tensor it is a slice of; fused checkpoints (transformers 5's in-memory layout) hold every
# expert in one tensor: mlp.experts.gate_up_proj (n_expert, 2*ff, n_embd), mlp.experts.down_proj.
EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
          "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
_HF_EXPERT = re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_HF_FUSED = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_HF_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.")


def canonical_from_hf(name: str, arch: str = "llama") -> str | None:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight; None if unknown."""
    name = name.removeprefix("model.language_model.").removeprefix("language_model.")
    if not name.startswith(("model.", "lm_head", "layers.")):
        name = "model." + name
    m = _HF_LAYER.match(name)
    table = HF_BLOCK_GEMMA3 if arch.startswith("gemma") else HF_BLOCK
    if m:
        il, mid, kind = m.groups()
        return f"blk.{il}.{table[mid]}.{kind}" if mid in table else None
    stem, _, kind = name.rpartition(".")
    return f"{HF_GLOBAL[stem]}.{kind}" if stem in HF_GLOBAL else None


def layer_of(canonical: str, n_layer: int) -> int:
    """Layer index of a canonical name: -1 for the embedding, n_layer for the output layer."""
    m = _GGUF_LAYER.match(canonical)
    if m:
        return int(m.group(1))
    if canonical.startswith(("token_embd", "rope_freqs")):
        return -1
    return n_layer


def expert_from_hf(name: str) -> tuple[str, int] | None:
    """model.layers.3.mlp.experts.17.up_proj.weight -> ("blk.3.ffn_up_exps.weight", 17); None if not one."""
    name = name.removeprefix("model.language_model.").removeprefix("language_model.").removeprefix("model.")
    m = _HF_EXPERT.match(name)
    if m is None or m.group(3) not in EXPERT:
        return None
    return f"blk.{m.group(1)}.{EXPERT[m.group(3)]}.weight", int(m.group(2))


def fused_experts_from_hf(name: str) -> tuple[int, str] | None:
    """model.layers.3.mlp.experts.gate_up_proj -> (3, "gate_up_proj"); None if not one."""
    m = _HF_FUSED.match(name.removeprefix("model.language_model.").removeprefix("model."))
    return (int(m.group(1)), m.group(2)) if m else None
