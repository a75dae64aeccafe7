"""Gemma 3 (text): embedding scaled by sqrt(n_embd); RMS norms before and after attention and
the FFN; per-head q/k norms; GELU-tanh gated FFN; sliding-window layers (local RoPE base)
interleaved with global layers (global RoPE base). Norm weights are used as stored: GGUF
files hold (1 + w) already and the safetensors loader adds the 1 at load."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..graph import INPUT, Graph
from ..ops import Op
from .llama import attention_block, output_head

_NO_SCALING: dict = {}
SWA_PATTERN = 6  # every 6th layer is global (llama.cpp's and transformers' default for Gemma 3)
ROPE_BASE_SWA = 10000.0  # local RoPE base when the file does not say (as llama.cpp and transformers)


@dataclass(frozen=True)
class Gemma3Layout:
    sliding: tuple[bool, ...]  # per layer: sliding-window attention?
    window: int  # tokens a sliding layer sees, itself included
    rope_base: float  # global layers
    rope_base_swa: float  # sliding layers
    attn_scale: float  # query_pre_attn_scalar ** -0.5
    rope_scaling: dict  # global layers (Gemma 3 4B and larger: linear, factor 8); local layers: none


def layout(cfg: ModelConfig) -> Gemma3Layout:
    """From GGUF metadata (extra keys without the arch prefix) or config.json (transformers' dict)."""
    x = cfg.extra or {}
    window = int(x.get("attention.sliding_window") or x.get("sliding_window") or 0)
    types = x.get("layer_types")
    if types:
        sliding = tuple(t == "sliding_attention" for t in types)
    else:
        pat = x.get("attention.sliding_window_pattern") or x.get("sliding_window_pattern") or SWA_PATTERN
        if isinstance(pat, (list, tuple)):  # GGUF may store one flag per layer
            sliding = tuple(bool(v) for v in pat)
        else:
            sliding = tuple(bool((il + 1) % int(pat)) for il in range(cfg.n_layer))
    if len(sliding) != cfg.n_layer:
        raise ValueError(f"gemma3: expected {cfg.n_layer} layer types, found {len(sliding)}")
    rp = x.get("rope_parameters") or {}
    base = cfg.rope_base
    base_swa = float(x.get("rope.freq_base_swa") or x.get("rope_local_base_freq") or ROPE_BASE_SWA)
    if isinstance(rp, dict) and "full_attention" in rp:
        base = float(rp["full_attention"].get("rope_theta", base))
        base_swa = float(rp.get("sliding_attention", {}).get("rope_theta", base_swa))
    scaling = {}
    if isinstance(rp, dict) and (rp.get("full_attention") or {}).get("rope_type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(rp["full_attention"]["factor"])}
    elif x.get("rope.scaling.type") == "linear" and x.get("rope.scaling.factor"):
        scaling = {"rope_type": "linear", "factor": float(x["rope.scaling.factor"])}
    scalar = x.get("query_pre_attn_scalar") or cfg.head_dim
    return Gemma3Layout(sliding, window, float(base), base_swa, float(scalar) ** -0.5, scaling)


def build(cfg: ModelConfig, names: set[str]) -> Graph:
    lay = layout(cfg)
    g = Graph(cfg.n_layer)
    eps = cfg.rms_eps
    x = g.add(Op.EMBED, "token_embd", (INPUT,), -1, ("token_embd.weight",))
    x = g.add(Op.SCALE, "embd_scale", (x,), -1, value=math.sqrt(cfg.n_embd))
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        swa = lay.sliding[il]
        h = g.add(Op.RMS_NORM, f"{p}attn_norm", (x,), il, (p + "attn_norm.weight",), eps=eps)
        h = attention_block(g, cfg, il, h, names, scale=lay.attn_scale,
                            rope_base=lay.rope_base_swa if swa else lay.rope_base,
                            rope_scaling=_NO_SCALING if swa else lay.rope_scaling,
                            **({"window": lay.window} if swa and lay.window else {}))
        h = g.add(Op.RMS_NORM, f"{p}post_attention_norm", (h,), il, (p + "post_attention_norm.weight",), eps=eps)
        x = g.add(Op.ADD, f"{p}attn_residual", (x, h), il)
        h = g.add(Op.RMS_NORM, f"{p}ffn_norm", (x,), il, (p + "ffn_norm.weight",), eps=eps)
        gate = g.add(Op.MATMUL, f"{p}gate", (h,), il, (p + "ffn_gate.weight",))
        up = g.add(Op.MATMUL, f"{p}up", (h,), il, (p + "ffn_up.weight",))
        h = g.add(Op.GEGLU, f"{p}geglu", (gate, up), il)
        h = g.add(Op.MATMUL, f"{p}down", (h,), il, (p + "ffn_down.weight",))
        h = g.add(Op.RMS_NORM, f"{p}post_ffw_norm", (h,), il, (p + "post_ffw_norm.weight",), eps=eps)
        x = g.add(Op.ADD, f"{p}ffn_residual", (x, h), il)
    g.output = output_head(g, cfg, x, names)
    return g
