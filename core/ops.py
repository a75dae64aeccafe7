"""The op vocabulary of a model graph. Backends announce which of these they run."""
from __future__ import annotations

import enum


class Op(enum.Enum):
    EMBED = "embed"  # token ids -> rows of the embedding table (ggml GET_ROWS)
    RMS_NORM = "rms_norm"  # x * rsqrt(mean(x^2) + eps) * w
    MATMUL = "matmul"  # x @ W.T (+ bias); W may be quantized
    ROPE = "rope"  # rotary position embedding, mode "norm" (adjacent pairs) or "neox" (halves)
    ATTENTION = "attention"  # writes K/V into the layer's cache, causal GQA over the cache
    SWIGLU = "swiglu"  # silu(gate) * up
    GEGLU = "geglu"  # gelu_tanh(gate) * up
    ADD = "add"
    SCALE = "scale"  # x * constant
    RMS_NORM_HEADS = "rms_norm_heads"  # per-head rms_norm: x (T, n_head*head_dim), weight (head_dim,)
    # mixture of experts: inputs (x, router logits (T, n_expert)[, shared FFN out, shared gate logit]);
    # weights the 3-D ffn_{gate,up,down}_exps; routes each token to its top-k experts (core/moe.py)
    # and sums their SwiGLU FFNs weighted by the routing weights (+ sigmoid(gate) * shared)
    MOE = "moe"


# Ops that read a weight tensor; the scheduler places them by where that weight lives.
WEIGHT_OPS = frozenset({Op.EMBED, Op.RMS_NORM, Op.MATMUL, Op.RMS_NORM_HEADS, Op.MOE})
