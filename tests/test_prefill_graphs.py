"""A resident prompt's ubatches in static form (core/replay.py prefill_eligible): token ids and
positions in device buffers, attention by device-side position (prefill_attention.py), replayed
from a CUDA graph on a GPU. The logits must match the eager path's: on the fake device (the
static form run eagerly, float32: NMSE <= 1e-8) and on a GPU (bf16: the captured graphs and the
eager ubatches with the same attention kernel, each against eager ubatches with cuDNN's SDPA,
NMSE <= 1e-3, for the prompt and three decode steps after it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lstream.api import Model
from lstream.core.policy import Never
from lstream.loaders.model_file import load_model

PROMPT = list(range(200, 248))  # three ubatches of 16


def _nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def _prompt_logits(m, prompt, times: int) -> list[np.ndarray]:
    outs = []
    for _ in range(times):
        m.reset()
        outs.append(np.array(m.eval(prompt)))
    return outs


def test_fake_device_static_prefill_matches_eager(smollm2_path):
    from fake_device import FakeDeviceBackend

    def model(static: bool) -> Model:
        be = FakeDeviceBackend(Never())
        be.static_prefill = static
        return Model(load_model(smollm2_path), n_gpu_layers=99, device_backend=be, n_ubatch=16, n_ctx=128,
                     load_tokenizer=False, device=None)
    ref = model(False)
    want = _prompt_logits(ref, PROMPT, 1)[0]
    want_more = _prompt_logits(ref, PROMPT + [7, 8, 9], 1)[0]
    ref.close()
    m = model(True)
    try:
        got = _prompt_logits(m, PROMPT, 2)
        # the first prompt: its first body ubatch and its last one (the head's plan) eager (not seen
        # yet), the second body ubatch static; the second prompt static throughout
        assert m.runner.replay.prefill_runs == 1 + 3
        for g in got:
            assert _nmse(g, want) < 1e-8
        # a remainder ubatch (3 tokens: a decode-sized step) after three static ones
        m.reset()
        y = np.array(m.eval(PROMPT + [7, 8, 9]))
        assert m.runner.replay.prefill_runs == 4 + 3
        assert _nmse(y, want_more) < 1e-8
    finally:
        m.close()


def test_static_prefill_only_where_the_kernel_applies(tmp_path):
    """Heads of 256 (Gemma 3) and a prompt whose experts are in host memory keep the eager path (no
    static form, no graph); resident experts (routed on the device) take the static form."""
    from fake_device import FakeDeviceBackend
    from lstream.loaders.registry import pull
    from lstream.tools.synth_model import write_model
    cases = [(write_model(tmp_path / "tiny.gguf", "tiny", "Q4_0", seed=1), True),
             (write_model(tmp_path / "tiny-moe.gguf", "tiny-moe", "Q4_0", seed=1), True)]
    try:
        cases.append((pull("gemma3-270m", quiet=True), False))
    except Exception:  # noqa: BLE001 - the registry unreachable: the synthetic cases still run
        pass
    cases.append((cases[1][0], False, {"cpu_moe": True}))
    for path, ok, *kw in cases:
        m = Model(load_model(path), n_gpu_layers=99, device_backend=FakeDeviceBackend(Never()), n_ctx=64,
                  load_tokenizer=False, device=None, **(kw[0] if kw else {}))
        try:
            assert m.device_backend.static_prefill_ok(m.plan(16)) is ok, (path, kw)
        finally:
            m.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_prefill_graphs_match_eager(monkeypatch, tmp_path):
    """Two layers of the Llama-3-8B shapes (GQA 32/8, head 128), three ubatches of 64 twice, then
    decode steps that read the K/V the static ubatches wrote."""
    from lstream.backends.cuda import CUDABackend
    from lstream.tools.synth_model import write_model
    path = write_model(tmp_path / "l8b-2l.gguf", "llama3-8b", "Q4_0", layers=2, seed=4)
    prompt = list(range(300, 300 + 3 * 64))

    def run(static: bool, kernel: bool = True):
        monkeypatch.setenv("LSTREAM_PREFILL_GRAPHS", "1" if static else "0")
        monkeypatch.setenv("LSTREAM_PREFILL_ATTN", "1" if kernel else "0")
        m = Model(load_model(path), n_gpu_layers=99, device_backend=CUDABackend(), n_ubatch=64, n_ctx=512,
                  load_tokenizer=False)
        try:
            logits = _prompt_logits(m, prompt, 2)
            for t in (5, 6, 7):
                logits.append(np.array(m.eval([t])))
            return logits, m.runner.replay.captures, m.runner.replay.prefill_runs
        finally:
            m.close()
    sdpa, _, _ = run(False, kernel=False)  # cuDNN's SDPA, eager
    eager, _, runs0 = run(False)
    static, captures, runs = run(True)
    assert runs0 == 0 and runs == 1 + 3 and captures >= 2  # the body's and the head's ubatch graphs
    for a, b, c in zip(static, eager, sdpa):
        assert _nmse(a, c) < 1e-3 and _nmse(b, c) < 1e-3


def test_prefill_graphs_are_capped():
    """Each captured prompt graph keeps its activations' memory: past MAX_PREFILL_GRAPHS sizes (a chat's
    many prompt remainders), a new size runs eagerly; a captured size stays replayed."""
    from types import SimpleNamespace

    from lstream.core import replay as R

    class Dev:
        name, graphs, static_prefill = "dev", True, True

        def static_prefill_ok(self, plan):
            return True
    r = R.StepReplay(None, Dev())
    r._whole = lambda plan, ctx: True
    plan = SimpleNamespace()

    def ctx(n):
        return SimpleNamespace(tokens=[0] * n, logits="last", profile=None, batch=None)
    sizes = list(range(16, 16 + R.MAX_PREFILL_GRAPHS + 2))
    assert not any(r.prefill_eligible(plan, ctx(n)) for n in sizes)  # first sightings: eager
    got = []
    for n in sizes:
        got.append(r.prefill_eligible(plan, ctx(n)))
        if got[-1]:
            r._graphs[("whole", id(plan), n)] = (plan,)  # what run() captures
    assert got == [True] * R.MAX_PREFILL_GRAPHS + [False] * 2
    assert r.prefill_eligible(plan, ctx(16))
