"""tools/synth_model.py writes GGUF files that gguf.GGUFReader reads back with the right shapes."""
from __future__ import annotations

import numpy as np
import pytest

from lstream.core.qtypes import QType, tensor_bytes
from lstream.tools.synth_model import PRESETS, tensor_plan, write_model

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("preset,qt", [("tiny", "Q4_0"), ("tiny", "Q4_K"), ("tiny", "Q8_0"), ("tiny-qwen", "Q6_K")])
def test_tiny_roundtrip(tmp_path, preset, qt):
    path = write_model(tmp_path / "m.gguf", preset, qt, out_type="Q6_K")
    r = gguf.GGUFReader(str(path))
    p = PRESETS[preset]
    assert r.fields["general.architecture"].contents() == p.arch
    assert r.fields[f"{p.arch}.block_count"].contents() == p.n_layers
    assert r.fields[f"{p.arch}.embedding_length"].contents() == p.dim
    assert r.fields[f"{p.arch}.attention.head_count_kv"].contents() == p.n_kv_heads
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == p.vocab
    tensors = {t.name: t for t in r.tensors}
    plan = tensor_plan(p, QType[qt], QType[qt], QType.Q6_K)
    assert set(tensors) == {n for n, _, _ in plan}
    for name, shape, t in plan:
        ti = tensors[name]
        assert int(ti.tensor_type) == int(t), name
        assert tuple(int(x) for x in ti.shape[::-1]) == shape, name  # GGUF stores ne0 first
        assert int(ti.n_bytes) == tensor_bytes(t, shape)
        w = gguf.quants.dequantize(ti.data, ti.tensor_type)
        assert np.isfinite(w).all(), name
        if name.endswith("ffn_up.weight"):
            assert 1e-3 < float(np.std(w)) < 0.1  # small weights: activations stay in range


def test_layers_option_and_size(tmp_path):
    path = write_model(tmp_path / "m.gguf", "tiny", "Q4_0", layers=1)
    r = gguf.GGUFReader(str(path))
    assert r.fields["llama.block_count"].contents() == 1
    assert not any(t.name.startswith("blk.1.") for t in r.tensors)


def test_llama3_8b_plan_size():
    # the model: 4.21 GiB with token_embd and output in Q4_0
    plan = tensor_plan(PRESETS["llama3-8b"], QType.Q4_0, QType.Q4_0, QType.Q4_0)
    total = sum(tensor_bytes(t, s) for _, s, t in plan)
    assert abs(total / 2**30 - 4.21) < 0.01
    layers = sum(tensor_bytes(t, s) for n, s, t in plan if n.startswith("blk."))
    assert abs(layers / 1e9 - 3.93) < 0.01
