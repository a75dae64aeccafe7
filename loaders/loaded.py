"""What every loader returns (a module of its own: the loaders import it, and model_file imports
the loaders, so no import cycle), and the chat templates an architecture gets when its file has none."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import ModelConfig
from ..core.residency import ResidencyMap


@dataclass
class LoadedModel:
    path: Path
    format: str  # "gguf" or "safetensors"
    config: ModelConfig
    residency: ResidencyMap
    tokenizer_source: tuple[str, str | None]  # (directory, gguf file name or None)
    metadata: dict = field(default_factory=dict)
    chat_template: str | None = None
    handle: Any = None  # keeps the memory map alive
    load_s: float = 0.0  # seconds load_model took: headers read, tensors mapped, checks (for --verbose)

    @property
    def file_size(self) -> int:
        return self.residency.total_bytes()

    @property
    def n_params(self) -> int:
        n = 0
        for e in self.residency:
            if e.alias_of is None:
                c = 1
                for d in e.shape:
                    c *= d
                n += c
        return n


# Chat templates of architectures whose files may carry none (base models), as llama.cpp knows
# them: `run --chat` uses these rather than falling back to plain completion.
BUILTIN_CHAT_TEMPLATES = {
    "gemma3": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\\n' + ((first_user_prefix if loop.first else '') + message['content']) | trim"
        " + '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"),
}
