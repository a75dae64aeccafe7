"""The OpenAI wire format of `lstream serve`: request bodies checked field by field (a wrong type is
a 400 with a one-line message naming the field; unknown fields are ignored, as OpenAI's clients send
extras), and the response and stream-chunk objects, with llama-server's `timings`."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from .core.serve_request import GenParams


class BadRequest(ValueError):
    """A request the server refuses with 400."""


@dataclass
class Parsed:
    params: GenParams
    stream: bool
    include_usage: bool
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions
    max_tokens_given: bool = False


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, found {type(body).__name__}")
    return body


def _num(body, key, lo=None, hi=None, integer=False, default=None):
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, found {json.dumps(v)[:40]}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise BadRequest(f"'{key}' must be {rng}, found {v}")
    return v


def _bool(body, key, default=False):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"'{key}' must be true or false, found {json.dumps(v)[:40]}")
    return v


def _stops(body) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > 16:
            raise BadRequest(f"'stop' takes at most 16 strings, found {len(v)}")
        return [s for s in v if s]
    raise BadRequest("'stop' must be a string or a list of strings")


def parse_params(body: dict, defaults: GenParams) -> tuple[GenParams, bool, bool, bool]:
    """(params, stream, include_usage, max_tokens given) from the fields both endpoints share."""
    for key in ("frequency_penalty", "presence_penalty"):
        if _num(body, key, default=0) != 0:
            raise BadRequest(f"'{key}' is not supported (use 'repeat_penalty')")
    if _num(body, "n", lo=1, integer=True, default=1) != 1:
        raise BadRequest("'n' must be 1: one choice per request")
    if body.get("logprobs") not in (None, False):
        raise BadRequest("'logprobs' is not supported")
    mt = None
    for key in ("max_completion_tokens", "max_tokens", "n_predict"):
        v = _num(body, key, lo=-1 if key == "n_predict" else 1, integer=True)
        if v is not None and v != -1:
            mt = v if mt is None else mt
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest("'stream_options' must be an object")
    p = GenParams(
        max_tokens=mt if mt is not None else defaults.max_tokens,
        temperature=_num(body, "temperature", 0, 100, default=defaults.temperature),
        top_k=_num(body, "top_k", 0, integer=True, default=defaults.top_k),
        top_p=_num(body, "top_p", 0, 1, default=defaults.top_p),
        min_p=_num(body, "min_p", 0, 1, default=defaults.min_p),
        repeat_penalty=_num(body, "repeat_penalty", 0, default=defaults.repeat_penalty),
        seed=_num(body, "seed", integer=True, default=defaults.seed),
        stop=_stops(body),
        ignore_eos=_bool(body, "ignore_eos"),
        cache_prompt=_bool(body, "cache_prompt", True))
    return p, _bool(body, "stream"), _bool(so or {}, "include_usage"), mt is not None


def _model(body) -> None:
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest("'model' must be a string")


def parse_chat(body: dict, defaults: GenParams) -> Parsed:
    _model(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    params, stream, usage, given = parse_params(body, defaults)
    return Parsed(params, stream, usage, messages=out, max_tokens_given=given)


def _content(c, i: int) -> str:
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: only text
        texts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")


def parse_completion(body: dict, defaults: GenParams) -> Parsed:
    _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt))
    if not ok:
        raise BadRequest("'prompt' must be a string, a list of one string, or a non-empty list of token ids")
    if _bool(body, "echo"):
        raise BadRequest("'echo' is not supported")
    if body.get("suffix") is not None:
        raise BadRequest("'suffix' is not supported")
    params, stream, usage, given = parse_params(body, defaults)
    return Parsed(params, stream, usage, prompt=prompt, max_tokens_given=given)


# -- responses ------------------------------------------------------------------------------
def error_body(status: int, message: str) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "unavailable_error"}.get(status, "server_error")
    return {"error": {"code": status, "message": message, "type": kind}}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(req) -> dict:
    n_prompt = len(req.prompt)
    return {"prompt_tokens": n_prompt, "completion_tokens": req.n_generated,
            "total_tokens": n_prompt + req.n_generated,
            "prompt_tokens_details": {"cached_tokens": req.timings.cache_n}}


def completion(chat: bool, rid: str, model: str, text: str, reason: str, req) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(req), "timings": req.timings.as_dict()}


def chunk(chat: bool, rid: str, model: str, text: str | None, reason: str | None, first: bool = False) -> dict:
    if chat:
        delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
