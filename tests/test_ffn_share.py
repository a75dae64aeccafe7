"""The device's share of the CPU's decode FFNs (backends/cuda/ffn_share.py, LayerSplit.share): the CPU
computes FFN columns [:r], the device the rest from bytes streamed every step. On the fake device
(copies deferred until waited for, slots poisoned) and, under the gpu marker, on a real GPU."""
from __future__ import annotations

import numpy as np
import pytest

from fake_device import FakeDeviceBackend
from lstream.api import Model
from lstream.backends.cpu.dequant import dequantize
from lstream.backends.cpu.ffn_share import cpu_weight
from lstream.backends.cuda.ffn_share import GRAIN, SLOTS, ffn_columns
from lstream.core.policy import LayerSplit, make_policy
from lstream.loaders.model_file import load_model
from lstream.tools.synth_model import write_model

N_LAYER = 6


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny", "Q4_0", layers=N_LAYER, seed=5)


@pytest.fixture(scope="module")
def reference(model_path):
    m = Model(load_model(model_path), n_ctx=256, load_tokenizer=False)
    toks = np.random.default_rng(1).integers(0, 512, 40)
    return toks, [m.eval(toks)] + [m.eval([t]) for t in (5, 9, 11, 13, 17)]


def _nmse(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("ngl,k", [(0, 6), (0, 3), (2, 3)])
def test_shared_ffn_decode_matches_the_cpu(model_path, reference, ngl, k):
    """k CPU layers, each with half of its FFN on the device: the same logits as the CPU alone, the
    device's part run once per CPU layer and step (6 layers > the share's slots: refilled in turn)."""
    toks, ref = reference
    m = Model(load_model(model_path), n_gpu_layers=ngl, device_backend=FakeDeviceBackend(LayerSplit(k, share=0.5)),
              n_ubatch=64, n_ctx=256, load_tokenizer=False)
    share = m.cpu.share
    assert share is not None and share.order == list(range(k)) and share.r == GRAIN  # (-ngl keeps the last layers)
    rt = m.device_backend.rt
    slots = [(b[0].data_ptr(), b[0].data_ptr() + b[0].numel()) for b in share.slots]
    copies = []  # copies into the share's slots during each decode step
    out = [m.eval(toks)]
    for t in (5, 9, 11, 13, 17):
        n0 = len(rt.log)
        out.append(m.eval([t]))
        copies.append(sum(1 for e in rt.log[n0:] if e[0] == "copy" and any(a <= e[2] < b for a, b in slots)))
    for a, b in zip(out, ref):
        assert _nmse(a, b) < 1e-6
    assert share.runs == 5 * k  # decode steps only: the prompt streams its layers whole
    assert len(share.slots) == min(SLOTS, k)
    # each layer's 3 copies once a step, all ahead (6 layers in 4 slots too: the copies a step's end
    # starts are the next step's first layers, in the slots it reads); held in the slots when they fit
    assert copies[1:] == [3 * k if k > SLOTS else 0] * 4


def test_share_off_and_back(model_path, reference):
    """set_policy to a policy without a share removes it; its device part then never runs."""
    toks, ref = reference
    m = Model(load_model(model_path), device_backend=FakeDeviceBackend(LayerSplit(6, share=0.5)), n_ubatch=64,
              n_ctx=256, load_tokenizer=False)
    first = m.cpu.share
    m.set_policy(LayerSplit(6))
    assert m.cpu.share is None
    out = [m.eval(toks)] + [m.eval([t]) for t in (5, 9)]
    for a, b in zip(out, ref):
        assert _nmse(a, b) < 1e-6
    assert first.runs == 0


def test_cpu_part_of_down_is_its_first_columns(model_path):
    """The CPU's down weight of a shared layer holds columns [:r] of the file's, exactly (oracle: the
    full weight dequantized)."""
    m = Model(load_model(model_path), n_ctx=64, load_tokenizer=False)
    e = m.residency["blk.1.ffn_down.weight"]
    w = cpu_weight(m.cpu, e.name, GRAIN)
    full = dequantize(e.qtype, np.asarray(e.data), e.n_cols).reshape(e.n_rows, e.n_cols)
    part = dequantize(w.qtype, w.raw, w.n_cols).reshape(w.n_rows, w.n_cols)
    assert w.n_cols == GRAIN and np.array_equal(part, full[:, :GRAIN])
    g = cpu_weight(m.cpu, "blk.1.ffn_gate.weight", GRAIN)
    assert g.n_rows == GRAIN and np.shares_memory(g.qs, m.cpu.weight("blk.1.ffn_gate.weight").qs)


def test_share_columns_and_policy_strings():
    assert ffn_columns(14336, 0.45) % GRAIN == 0 and abs(ffn_columns(14336, 0.45) / 14336 - 0.55) < 0.01
    assert ffn_columns(512, 0.9) == GRAIN  # the CPU keeps at least one grain
    p = make_policy("split:14:0.4")
    assert (p.cpu_layers, p.share) == (14, 0.4) and "share 0.40" in p.describe()
    assert make_policy("split:3").share == 0.0
    for bad in ("split:3:1.5", "split:3:x", "split:-1"):
        with pytest.raises(ValueError):
            make_policy(bad)


@pytest.mark.gpu
def test_shared_ffn_on_the_gpu_gives_the_same_greedy_tokens(tmp_path):
    """On the GPU (pinned arena, 2-D copies, each layer's part a CUDA graph): large activations
    (--scale 0.02 blocks) decode to the same greedy tokens with and without the share."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path = write_model(tmp_path / "big.gguf", "llama3-8b-v4k", "Q4_0", layers=6, seed=3, scale=0.02)

    def greedy(policy):
        m = Model(load_model(path), n_gpu_layers=0, policy=policy, n_ctx=256, load_tokenizer=False)
        toks, out = [1, 2, 3, 4], []
        logits = m.eval(toks)
        for _ in range(12):
            t = int(np.argmax(logits))
            out.append(t)
            logits = m.eval([t])
        runs = m.cpu.share.runs if m.cpu.share is not None else 0
        m.close()
        return out, logits, runs

    ref, ref_logits, _ = greedy(LayerSplit(6))
    got, logits, runs = greedy(LayerSplit(6, share=0.45))
    assert runs == 13 * 6  # the 4-token prompt is decode-sized too
    assert got == ref
    assert _nmse(logits, ref_logits) < 1e-3
