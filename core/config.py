"""Model hyper-parameters, filled by a loader from GGUF metadata or config.json."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    arch: str  # llama, qwen2, qwen3, gemma3
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    n_ctx_train: int = 4096
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_dim: int = 0  # rotated dims per head (0: all)
    rope_mode: str = "norm"  # "norm": adjacent pairs (GGUF llama); "neox": halves (HF, qwen)
    rope_scaling: dict = field(default_factory=dict)  # llama3: factor, low/high_freq_factor, original_context
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = False
    name: str = ""
    extra: dict = field(default_factory=dict)  # architecture-specific (e.g. gemma3 sliding window)
    # mixture of experts (0: a dense model): experts per MoE layer, experts per token, the experts'
    # FFN width, and whether the top-k routing weights are renormalized to sum to 1
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    expert_norm: bool = True

    def __post_init__(self):
        if not self.rope_dim:
            self.rope_dim = self.head_dim
