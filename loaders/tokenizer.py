"""Tokenizer and chat template from the model file itself, through transformers.

Importing this module changes nothing in the process (no environment variables): transformers is
told to be quiet through its logging API around each call, and never to reach the network through
local_files_only=True."""
from __future__ import annotations

import contextlib
import os

from ..core.errors import ModelFormatError


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


class Tokenizer:
    def __init__(self, source: tuple[str, str | None], chat_template: str | None, bos_id, eos_ids, add_bos: bool):
        directory, gguf_file = source
        try:
            with quiet_transformers():
                from transformers import AutoTokenizer
                kw = {"gguf_file": gguf_file} if gguf_file else {}
                self.hf = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kw)
        except Exception as e:  # transformers raises many kinds for a bad vocabulary
            where = os.path.join(directory, gguf_file or "")
            raise ModelFormatError(where, f"cannot build the tokenizer ({type(e).__name__}: {e})") from None
        self.chat_template = chat_template or getattr(self.hf, "chat_template", None)
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.eos_ids = set(eos_ids)
        if self.hf.eos_token_id is not None:
            self.eos_ids.add(self.hf.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            # No template in the file: plain completion of the turns, said so by the caller.
            return "".join(m["content"] + "\n" for m in messages)
        with quiet_transformers():
            return self.hf.apply_chat_template(messages, chat_template=self.chat_template,
                                               add_generation_prompt=add_generation_prompt, tokenize=False)


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
