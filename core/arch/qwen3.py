"""Qwen3: the llama block without q/k/v biases, with a per-head RMS norm on q and k before RoPE
(neox rotation, unpermuted q/k in both GGUF and safetensors). Qwen2/2.5 is llama plus biases."""
from __future__ import annotations

from ..config import ModelConfig
from ..graph import Graph
from . import llama


def build(cfg: ModelConfig, names: set[str]) -> Graph:
    missing = [n for n in ("blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight") if n not in names]
    if missing:
        raise ValueError(f"qwen3: tensor {missing[0]} missing (Qwen3 normalizes q and k per head)")
    return llama.build(cfg, names)  # attention_block inserts the q/k norms it finds
