"""The Python API as the README shows it: load with a policy, generate/stream/chat, score, bench,
a policy of one's own (seen through the fake device backend, so no GPU is needed)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

import lstream
from lstream import Always, BatchThreshold, Never, Sampler, SamplerConfig, UploadPolicy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    m = lstream.load("smollm2-135m", n_gpu_layers=0, policy=BatchThreshold(64), n_ctx=256, n_threads=1)
    yield m
    m.close()


def test_generate_stream_chat(model):
    out = model.generate("The capital of France is", n_predict=6, temp=0)
    assert isinstance(out, str) and out
    assert model.generate("The capital of France is", n_predict=6, temp=0) == out  # greedy is deterministic
    model.reset()
    pieces = list(model.stream("Once upon a time", n_predict=6, sampler=Sampler(SamplerConfig(temp=0.7, seed=1))))
    assert pieces and all(isinstance(p, str) for p in pieces)
    reply = model.chat([{"role": "user", "content": "Say hi."}], n_predict=6)
    assert isinstance(reply, str)
    assert model.policy.describe() == "threshold(64)"


def test_score_and_bench(model):
    text = (ROOT / "tests" / "data" / "declaration.txt").read_text()
    tokens = model.tokenize(text, bos=False)
    res = model.perplexity(text[: len(text) // 3], n_ctx=64)
    assert res.ppl == pytest.approx(math.exp(res.nll.mean())) and res.err > 0 and len(tokens) > 256
    results = lstream.bench(model, n_prompt=8, n_gen=2, reps=2)
    assert [r.name for r in results] == ["pp8", "tg2"]
    assert all(len(r.samples_ns) == 2 and r.avg_ts > 0 for r in results)


class OnlyFFN(UploadPolicy):
    """Upload only the feed-forward weights, from 16 tokens on."""
    name = "only-ffn"

    def should_upload(self, op, entry, n_tokens):
        return n_tokens >= 16 and entry is not None and "ffn" in entry.name


def test_policies_decide_uploads_through_the_device_backend():
    from fake_device import FakeDeviceBackend
    from lstream.api import Model
    from lstream.loaders.model_file import load_model
    from lstream.loaders.registry import resolve
    m = Model(load_model(resolve("smollm2-135m")), n_gpu_layers=0, device_backend=FakeDeviceBackend(),
              n_ctx=64, n_threads=1, load_tokenizer=False)
    try:
        got = {}
        for pol in (Never(), Always(), BatchThreshold(32), OnlyFFN()):
            m.set_policy(pol)
            got[pol.describe()] = (m.plan(64).upload_bytes, m.plan(1).upload_bytes)
            if isinstance(pol, OnlyFFN):
                uploads = [w for w, _ in m.plan(64).uploads()]
                assert uploads and all("ffn" in w for w in uploads)
    finally:
        m.close()
    assert got["never"] == (0, 0)
    assert got["always"][0] > 0 and got["always"][1] > 0
    assert got["threshold(32)"][0] == got["always"][0] and got["threshold(32)"][1] == 0
    assert 0 < got["only-ffn"][0] < got["always"][0] and got["only-ffn"][1] == 0


def test_example_script_defines_a_working_policy():
    spec = importlib.util.spec_from_file_location("example_api", ROOT / "tools" / "example_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from lstream.core.ops import Op
    pol = mod.UploadBigMatmuls(64, 1 << 20)

    class E:
        nbytes = 2 << 20
    assert pol.should_upload(Op.MATMUL, E(), 128) and not pol.should_upload(Op.MATMUL, E(), 8)
    E.nbytes = 1000
    assert not pol.should_upload(Op.MATMUL, E(), 128)
