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
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Gemma 3 puts a norm after attention and another before the FFN.
HF_BLOCK_GEMMA3 = {**HF_BLOCK, "post_attention_layernorm": "post_attention_norm"}

HF_GLOBAL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}

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
