"""A multi-turn chat over one model: the model's chat template, history, and the K/V cache reused
across turns (only the tokens after the longest common prefix with what is cached are evaluated)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..core.timings import Timings
from ..core.kv_cache import ContextFullError
from ..loaders.tokenizer import StreamDecoder


@dataclass
class Answer:
    text: str
    timings: Timings
    stop: str  # "eos" | "limit" (-n reached) | "context" (context full) | "interrupted"
    n_reused: int  # prompt tokens taken from the cache instead of evaluated


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, model, sampler, system_prompt: str | None = None, n_predict: int = -1):
        self.model, self.sampler, self.system_prompt, self.n_predict = model, sampler, system_prompt, n_predict
        self.messages: list[dict] = []
        self.cached: list[int] = []  # the tokens whose K/V are in the model's cache, in order
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cached = []
        self.model.reset()

    def render(self, messages: list[dict]) -> list[int]:
        text = self.model.tokenizer.apply_chat(messages, add_generation_prompt=True)
        return self.model.tokenize(text, bos=False)

    def answer(self, user_text: str, on_piece: Callable[[str], None] = lambda s: None) -> Answer:
        """Generate the assistant's reply to `user_text`, streaming pieces to on_piece.

        KeyboardInterrupt during generation stops the answer (the partial reply stays in the history).
        A conversation that no longer fits in the context raises ContextFullError and leaves the
        history as it was."""
        model = self.model
        msgs = self.messages + [{"role": "user", "content": user_text}]
        full = self.render(msgs)
        n_ctx = model.kv.n_ctx
        if len(full) >= n_ctx:
            raise ContextFullError(f"context full: the conversation is {len(full)} tokens, the context "
                                   f"{n_ctx} (/reset to start over, or raise -c)")
        # Reuse the cached prefix; at least one token is evaluated, for the logits.
        keep = min(common_prefix(self.cached, full), len(full) - 1)
        model.kv.truncate(keep)
        self.cached = self.cached[:keep]
        limit = self.n_predict if self.n_predict >= 0 else n_ctx
        timings = Timings()
        dec = StreamDecoder(model.tokenizer)
        generated: list[int] = []
        stop = "eos"
        try:
            for tok in model.generate_tokens(full[keep:], limit, self.sampler, timings):
                generated.append(tok)
                piece = dec.push(tok)
                if piece:
                    on_piece(piece)
            if len(generated) >= limit and self.n_predict >= 0:
                stop = "limit"
            elif model.n_past >= n_ctx:
                stop = "context"
        except KeyboardInterrupt:
            stop = "interrupted"
        finally:
            # What the cache holds now: the prompt and every generated token that was evaluated.
            self.cached = (full + generated)[:model.n_past]
        text = model.tokenizer.decode(generated)
        self.messages = msgs + [{"role": "assistant", "content": text}]
        return Answer(text, timings, stop, keep)


def timings_line(t: Timings) -> str:
    """llama-cli's summary after an answer."""
    pp = t.prompt_tokens / t.prompt_s if t.prompt_s else 0.0
    tg = t.gen_tokens / t.gen_s if t.gen_s else 0.0
    return f"[ Prompt: {t.prompt_tokens} tokens, {pp:.1f} t/s | Generation: {t.gen_tokens} tokens, {tg:.1f} t/s ]"


def perf_lines(t: Timings, load_s: float | None = None) -> str:
    """llama_perf_context_print's lines."""
    def line(label, s, n, unit):
        per = 1e3 * s / n if n else 0.0
        tps = n / s if s else 0.0
        return (f"{label} = {1e3 * s:10.2f} ms / {n:5d} {unit} ({per:8.2f} ms per token, "
                f"{tps:8.2f} tokens per second)")
    out = []
    if load_s is not None:
        out.append(f"       load time = {1e3 * load_s:10.2f} ms")
    out.append(line("prompt eval time", t.prompt_s, t.prompt_tokens, "tokens"))
    out.append(line("       eval time", t.gen_s, t.gen_tokens, "runs  "))
    out.append(f"      total time = {1e3 * (t.prompt_s + t.gen_s):10.2f} ms / {t.prompt_tokens + t.gen_tokens:5d} tokens")
    return "\n".join(out)


def load_lines(model, load_s: float) -> str:
    """Where load time went, one line each as llama.cpp's timing lines: reading the model file,
    the tokenizer (from its cache or converted from the file), and the rest (backend setup:
    weights packed for the CPU, device memory, plans)."""
    file_s = model.loaded.load_s if model.loaded is not None else 0.0
    tok = model.tokenizer
    tok_s = tok.load_s if tok is not None else 0.0
    name = model.loaded.path.name if model.loaded is not None else "?"
    rest = max(load_s - file_s - tok_s, 0.0)
    backends = " + ".join(b.name for b in model.backends)
    lines = [f"{'model file time':>16} = {1e3 * file_s:10.2f} ms ({name}: headers read, tensors mapped)"]
    if tok is not None:
        lines.append(f"{'tokenizer time':>16} = {1e3 * tok_s:10.2f} ms ({tok.origin})")
    lines.append(f"{'backend setup':>16} = {1e3 * rest:10.2f} ms ({backends})")
    return "\n".join(lines)


def now() -> float:
    return time.perf_counter()
