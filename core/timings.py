"""Prompt and generation timings of a run, as llama.cpp prints them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0

    def line(self) -> str:
        pp = self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0
        tg = self.gen_tokens / self.gen_s if self.gen_s else 0.0
        return (f"prompt: {self.prompt_tokens} tokens, {pp:.1f} t/s | "
                f"generation: {self.gen_tokens} tokens, {tg:.1f} t/s")
