"""One graph builder per architecture; `build_graph` picks it from the config."""
from __future__ import annotations

from ..config import ModelConfig
from ..graph import Graph
from . import gemma3, llama, qwen3

BUILDERS = {
    "llama": llama.build,
    "mistral": llama.build,
    "qwen2": llama.build,  # llama with q/k/v biases (picked up from the tensors present)
    "qwen3": qwen3.build,  # llama with per-head q/k RMS norms, no biases
    # mixtures of experts: Mixtral is "llama" with experts (llama.cpp names it so); the FFN of a
    # layer with a router becomes the experts (core/arch/moe.py)
    "qwen3moe": qwen3.build,  # qwen3 with experts (128, top-8, renormalized weights)
    "qwen2moe": llama.build,  # qwen2 with experts and a sigmoid-gated shared expert
    "gemma3": gemma3.build,
}

SUPPORTED = tuple(sorted(BUILDERS))


class UnsupportedArchitecture(ValueError):
    pass


def build_graph(cfg: ModelConfig, tensor_names: set[str]) -> Graph:
    try:
        builder = BUILDERS[cfg.arch]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {cfg.arch!r}: expected one of {', '.join(SUPPORTED)}") from None
    return builder(cfg, tensor_names)
