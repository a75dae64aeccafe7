"""Tokenizer and chat template from the model file itself.

A GGUF file's vocabulary becomes a tokenizer through transformers' GGUF converter, which parses
the whole file again (SmolLM2: ~20 s, Gemma 3: ~60 s, and transformers with torch imported). That
is done once per file: the converted tokenizer is saved as a Hugging Face tokenizer folder in the
cache ($LSTREAM_CACHE/tokenizers, see tokenizer_cache.py), and every later load reads its
tokenizer.json with the `tokenizers` library (the engine under transformers' fast tokenizers) in
a fraction of a second, without importing transformers. Chat templates are still rendered by
transformers' own renderer, imported when a template is first applied.

Importing this module changes nothing in the process (no environment variables): transformers
is told to be quiet through its logging API around each call, and never to reach the network
through local_files_only=True."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..core.errors import ModelFormatError
from . import tokenizer_cache


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings silenced for the duration of a call, its verbosity restored after."""
    from transformers.utils import logging as hf_logging
    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(prev)


class FastBackend:
    """A `tokenizers.Tokenizer` plus what transformers' wrapper adds that lstream uses (eos id,
    vocabulary size with added tokens, special tokens for chat templates). Encodes and decodes as
    transformers' TokenizersBackend does: its encode/decode call these same methods with the
    same arguments (tests/test_tokenizer_cache.py checks the ids and texts agree)."""

    def __init__(self, tok, info: dict, folder: str | None = None):
        self.folder = folder  # the cache folder it was read from or saved to (None: not cached)
        tok.no_truncation()  # what transformers sets before every encode (DO_NOT_TRUNCATE / DO_NOT_PAD)
        tok.no_padding()
        tok.encode_special_tokens = False  # transformers' split_special_tokens default
        self.tok, self.info = tok, info
        self.eos_token_id = info.get("eos_token_id")
        self.chat_template = info.get("chat_template")

    @staticmethod
    def info_of(hf) -> dict | None:
        """What FastBackend needs from a transformers tokenizer; None when its encode or decode
        would differ from the bare `tokenizers` object's (a slow tokenizer, or one that cleans up
        spaces after decoding)."""
        if getattr(hf, "backend_tokenizer", None) is None or getattr(hf, "clean_up_tokenization_spaces", False):
            return None
        if getattr(hf, "split_special_tokens", False):
            return None
        return {"eos_token_id": hf.eos_token_id, "vocab_size": len(hf),
                "special_tokens_map": dict(hf.special_tokens_map), "chat_template": hf.chat_template}

    def __len__(self) -> int:
        return self.info["vocab_size"]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def render_chat(self, messages, chat_template: str, add_generation_prompt: bool) -> str:
        """transformers' apply_chat_template(tokenize=False): its renderer, the tokenizer's special
        tokens as template variables, messages without their None values."""
        with quiet_transformers():
            from transformers.utils.chat_template_utils import render_jinja_template
            chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
            rendered, _ = render_jinja_template(conversations=[chat], tools=None, documents=None,
                                                chat_template=chat_template, return_assistant_tokens_mask=False,
                                                continue_final_message=False,
                                                add_generation_prompt=add_generation_prompt,
                                                **self.info["special_tokens_map"])
        return rendered[0]


class HFBackend:
    """A transformers tokenizer as it is (Hugging Face model folders, and tokenizers that the fast
    path does not reproduce)."""

    def __init__(self, hf):
        self.hf = hf
        self.eos_token_id = hf.eos_token_id
        self.chat_template = getattr(hf, "chat_template", None)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def render_chat(self, messages, chat_template: str, add_generation_prompt: bool) -> str:
        with quiet_transformers():
            return self.hf.apply_chat_template(messages, chat_template=chat_template,
                                               add_generation_prompt=add_generation_prompt, tokenize=False)


def from_transformers(directory: str, gguf_file: str | None):
    """transformers' AutoTokenizer over a model folder or a GGUF file (the slow path)."""
    try:
        with quiet_transformers():
            from transformers import AutoTokenizer
            kw = {"gguf_file": gguf_file} if gguf_file else {}
            return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kw)
    except Exception as e:  # transformers raises many kinds for a bad vocabulary
        where = os.path.join(directory, gguf_file or "")
        raise ModelFormatError(where, f"cannot build the tokenizer ({type(e).__name__}: {e})") from None


def load_backend(directory: str, gguf_file: str | None) -> tuple[object, str]:
    """(backend, where it came from): a GGUF file's tokenizer from the cache when a valid one is
    there, else converted and cached; a model folder's through transformers."""
    if not gguf_file:
        return HFBackend(from_transformers(directory, None)), "transformers (model folder)"
    path = Path(directory) / gguf_file
    hit = tokenizer_cache.load(path)
    if hit is not None:
        return FastBackend(*hit), "cache"
    hf = from_transformers(directory, gguf_file)
    info = FastBackend.info_of(hf)
    if info is None:
        return HFBackend(hf), "converted from the GGUF file (not cacheable)"
    with quiet_transformers():
        folder = tokenizer_cache.save(path, hf, info)
    return FastBackend(hf.backend_tokenizer, info, folder), \
        "converted from the GGUF file, " + ("cached" if folder else "cache not writable")


class Tokenizer:
    def __init__(self, source: tuple[str, str | None], chat_template: str | None, bos_id, eos_ids, add_bos: bool):
        t0 = time.perf_counter()
        directory, gguf_file = source[0], source[1]
        self.backend, self.origin = load_backend(directory, gguf_file)
        self.chat_template = chat_template or self.backend.chat_template
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.eos_ids = set(eos_ids)
        if self.backend.eos_token_id is not None:
            self.eos_ids.add(self.backend.eos_token_id)
        self.load_s = time.perf_counter() - t0  # for --verbose: where load time goes

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids])

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            # No template in the file: plain completion of the turns, said so by the caller.
            return "".join(m["content"] + "\n" for m in messages)
        return self.backend.render_chat(messages, self.chat_template, add_generation_prompt)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece
