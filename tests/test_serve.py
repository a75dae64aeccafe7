"""`lstream serve` end to end: the real server started on 127.0.0.1 in a fixture (a subprocess of
`python -m lstream.cli serve` with SmolLM2), driven by the official `openai` client and raw HTTP
(httpx2 or httpx, whichever the client brings). No mocks."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
try:  # the HTTP client the openai package brings: httpx2 in its recent versions, httpx before
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["Write a haiku about the sea.", "Name three colours.", "Count from one to five.",
           "What is two plus two?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str):
        from lstream.loaders.registry import pull
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lstream.cli", "serve", "-m", str(pull("smollm2-135m", quiet=True)),
               "--port", str(self.port), "-t", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("lstream serve exited:\n" + "".join(self.log))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError("lstream serve did not start:\n" + "".join(self.log))

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def server():
    s = Server("-np", "4", "-c", "2048", "--queue-size", "8")
    yield s
    assert s.stop() == 0, "".join(s.log)


def _chat(client, content, n=16, **kw):
    return client.chat.completions.create(model="x", messages=[{"role": "user", "content": content}],
                                          max_tokens=n, temperature=0, **kw)


def test_health_models_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert models.data[0].id.startswith("SmolLM2") and models.data[0].owned_by == "lstream"
    text = httpx.get(server.url + "/metrics").text
    for name in ("lstream_requests_waiting", "lstream_slots_active", "lstream_tokens_per_second",
                 "lstream_request_prefill_seconds_bucket", "lstream_request_decode_seconds_sum"):
        assert name in text
    assert "# TYPE lstream_slots_active gauge" in text


def test_chat_and_timings(server):
    r = server.client().chat.completions.create(model="x", messages=CHAT, max_tokens=12, temperature=0)
    # serve's int8 activations (--act8) answer as llama-server does here ("L'Étoile, la Marseillaise,"),
    # int16 "The capital of France is Paris.": their closeness is test_batching's (logits NMSE)
    assert r.choices[0].message.content.strip() and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10
    t = r.model_extra["timings"]
    assert t["prompt_n"] + t["cache_n"] == r.usage.prompt_tokens and t["predicted_n"] == r.usage.completion_tokens
    assert t["predicted_per_second"] > 0 and t["prompt_ms"] > 0


def test_streaming_equals_whole(server):
    c = server.client()
    whole = _chat(c, PROMPTS[0], 20).choices[0].message.content
    chunks = list(c.chat.completions.create(model="x", messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and "timings" in finals[0].model_extra
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completions_max_tokens_and_stop(server):
    c = server.client()
    r = c.completions.create(model="x", prompt="The capital of France is", max_tokens=5, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    full = r.choices[0].text
    assert "Paris" in full
    cut = full.index("Paris") + len("Pa")
    stop = full[cut:cut + 3]  # a stop string inside the answer: the text ends right before it
    r2 = c.completions.create(model="x", prompt="The capital of France is", max_tokens=5, temperature=0, stop=[stop])
    assert r2.choices[0].text == full[:cut] and r2.choices[0].finish_reason == "stop"
    s = c.completions.create(model="x", prompt="The capital of France is", max_tokens=5, temperature=0,
                             stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in s) == full[:cut]


def test_concurrent_equals_one_at_a_time(server):
    c = server.client()
    alone = [_chat(c, p, 24, extra_body={"ignore_eos": True}).choices[0].message.content for p in PROMPTS]
    got: dict[int, str] = {}

    def go(i):
        got[i] = _chat(server.client(), PROMPTS[i], 24, extra_body={"ignore_eos": True}).choices[0].message.content
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert [got[i] for i in range(len(PROMPTS))] == alone
    assert server.metric("lstream_decode_batch_size") >= 1


def test_conversation_reuses_its_prefix(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Tell me about cats in two sentences, please."}]
    r1 = c.chat.completions.create(model="x", messages=msgs, max_tokens=24, temperature=0)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And dogs?"}]
    r2 = c.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= 16
    r3 = c.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0,
                                   extra_body={"cache_prompt": False})
    assert r3.usage.prompt_tokens_details.cached_tokens == 0
    assert r3.choices[0].message.content == r2.choices[0].message.content  # the cache changes no bit


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": CHAT, "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"messages": CHAT, "temperature": [1]}).encode(), "temperature"),
    (json.dumps({"messages": CHAT, "stop": 3}).encode(), "stop"),
    (json.dumps({"messages": CHAT, "stream": "yes"}).encode(), "stream"),
    (json.dumps({"messages": [{"role": "user", "content": "hi " * 3000}]}).encode(), "context"),
])
def test_bad_requests_get_400(server, body, needle):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert needle in err["message"] and "\n" not in err["message"] and err["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored_and_bad_types_raise_in_the_client(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "whatever": {"x": 1}},
                   timeout=60)
    assert r.status_code == 200
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="x", messages=CHAT, max_tokens=-3)
    assert httpx.get(server.url + "/nope").status_code == 404


def test_disconnect_frees_the_slot(server):
    body = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 1000,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator may close the response
        for line in lines:
            if line.startswith("data:") and '"content"' in line and '""' not in line:
                break
        assert server.metric("lstream_slots_active") == 1
    deadline = time.time() + 20
    while time.time() < deadline and server.metric("lstream_slots_active") != 0:
        time.sleep(0.1)
    assert server.metric("lstream_slots_active") == 0
    assert server.metric('lstream_requests_total{reason="cancelled"}') >= 1


def test_queue_full_503_and_sigterm_exits_cleanly():
    s = Server("-np", "1", "-c", "512", "--queue-size", "1", "--grace", "3")
    try:
        body = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 400,
                "temperature": 0, "stream": True, "ignore_eos": True}
        streams = [httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=120) for _ in range(2)]
        resp = [st.__enter__() for st in streams]  # one running, one waiting
        lines = resp[0].iter_lines()
        next(line for line in lines if line.startswith("data:"))
        deadline = time.time() + 20
        while s.metric("lstream_requests_waiting") != 1 and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(openai.APIStatusError) as e:
            s.client().chat.completions.create(model="x", messages=CHAT, max_tokens=2)
        assert e.value.status_code == 503 and "queue" in e.value.message
        assert s.metric("lstream_requests_rejected_total") == 1
        s.proc.send_signal(signal.SIGTERM)
        rest = "\n".join(lines)  # the running stream ends: finished within --grace or cancelled
        assert rest.rstrip().endswith("data: [DONE]")
        assert s.proc.wait(timeout=60) == 0
        waiting = "\n".join(resp[1].iter_lines())  # the waiting one was refused at the signal
        assert resp[1].status_code == 503 or "shutting down" in waiting
        for st in streams:
            st.__exit__(None, None, None)
        assert "lstream serve: stopped" in "".join(s.log)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


@pytest.mark.skipif(os.environ.get("LSTREAM_LOAD_TEST") != "1", reason="set LSTREAM_LOAD_TEST=1 (minutes)")
def test_load_tool_against_the_server(server, tmp_path):
    from lstream.tools.load_test import run_level, same_outputs
    levels = [run_level(server.url + "/v1", "x", c, 2, 16, 300, True) for c in (1, 8)]
    assert all(lv["errors"] == 0 and lv["incomplete"] == 0 for lv in levels)
    assert same_outputs(levels) == []


def test_port_taken_is_one_error_line_and_a_nonzero_exit():
    """uvicorn runs on a thread of its own (the engine keeps the main thread): its failure to bind
    still ends the process with its status, one error line and no traceback."""
    from lstream.loaders.registry import pull
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "lstream.cli", "serve", "-m", str(pull("smollm2-135m", quiet=True)),
                            "--port", str(port), "-t", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "address already in use" in r.stderr and "Traceback" not in r.stderr, r.stderr
