"""tools/synth_model.py's mixture-of-experts presets: real shapes (Qwen3-30B-A3B, Mixtral 8x7B) in
the plan, and a small MoE file written, read back and run (3-D K-quant experts through the CPU's
grouped decode kernels)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lstream.core.qtypes import QType, tensor_bytes
from lstream.tools.synth_model import PRESETS, tensor_plan, write_model

gguf = pytest.importorskip("gguf")


def _params(plan) -> float:
    return sum(int(np.prod(s)) for _, s, _ in plan) / 1e9


@pytest.mark.parametrize("preset,params,active", [("qwen3-30b-a3b", 30.53, 3.35), ("mixtral-8x7b", 46.70, 12.88)])
def test_moe_presets_real_shapes(preset, params, active):
    p = PRESETS[preset]
    plan = tensor_plan(p, QType.Q4_K, QType.Q4_K, QType.Q6_K)
    assert abs(_params(plan) - params) < 0.01  # as the model cards count them
    experts = sum(int(np.prod(s)) for n, s, _ in plan if "_exps" in n) / 1e9
    assert abs(_params(plan) - experts * (1 - p.n_expert_used / p.n_expert) - active) < 0.01
    gate = next(s for n, s, _ in plan if n == "blk.0.ffn_gate_exps.weight")
    assert gate == (p.n_expert, p.ffn_exp, p.dim)
    assert next(t for n, _, t in plan if n == "blk.0.ffn_gate_inp.weight") == QType.F32  # routers stay float


@pytest.mark.parametrize("qt", ["Q4_K", "Q8_0"])
def test_tiny_moe_written_and_run(tmp_path, qt):
    import lstream
    path = write_model(tmp_path / "m.gguf", "tiny-moe", qt, layers=2)
    r = gguf.GGUFReader(str(path))
    p = PRESETS["tiny-moe"]
    assert r.fields["qwen3moe.expert_count"].contents() == p.n_expert
    tensors = {t.name: t for t in r.tensors}
    for name, shape, t in tensor_plan(replace(p, n_layers=2), QType[qt], QType[qt], QType[qt]):
        assert tuple(int(x) for x in tensors[name].shape[::-1]) == shape, name
        assert int(tensors[name].n_bytes) == tensor_bytes(t, shape)
    del r, tensors
    with lstream.load(str(path), n_ctx=64, load_tokenizer=False) as m:
        assert (m.config.arch, m.config.n_expert, m.config.n_ff_exp, m.config.head_dim) == ("qwen3moe", 8, 256, 64)
        assert m.residency["blk.1.ffn_down_exps.weight"].shape == (8, 256, 256)
        a = m.eval(list(range(1, 17)))
        b = m.eval([5])
        m.reset()
        c = m.eval(list(range(1, 17)) + [5], logits="all")
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert np.abs(c[-1] - b).max() < 1e-3 * np.abs(b).max() + 1e-4  # decode (grouped kernels) = prefill's last row
