"""One graph builder per architecture; `build_graph` picks it from the config."""
from __future__ import annotations

from ..config import ModelConfig
from ..graph import Graph
from . import llama

BUILDERS = {
    "llama": llama.build,
    "mistral": llama.build,
    "qwen2": llama.build,  # llama with q/k/v biases (picked up from the tensors present)
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
