"""safetensors end to end on a real checkpoint: SmolLM2 loaded from its GGUF by transformers,
saved with save_pretrained (bf16, f32, and bf16 sharded through an index file) with its tokenizer
and chat template, then run by lstream against transformers on that checkpoint and against the
GGUF run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lstream  # noqa: E402

DATA = Path(__file__).parent / "data"
PPL_CTX = 256


@pytest.fixture(scope="session")
def smollm2_checkpoints(smollm2_path, hf_smollm2, tmp_path_factory):
    """{"bf16": dir, "f32": dir, "sharded": dir} written once per session."""
    from transformers import AutoTokenizer
    import gguf
    tok = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    template = gguf.GGUFReader(smollm2_path).fields["tokenizer.chat_template"].contents()
    tok.chat_template = tok.chat_template or template
    import copy
    from transformers import AutoModelForCausalLM
    # a plain copy: the model transformers dequantized from the GGUF refuses save_pretrained
    cfg = copy.deepcopy(hf_smollm2.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(hf_smollm2.state_dict())
    root = tmp_path_factory.mktemp("smollm2_st")
    out = {}
    for kind, dtype, shard in (("f32", torch.float32, None), ("bf16", torch.bfloat16, None),
                               ("sharded", torch.bfloat16, "60MB")):
        d = root / kind
        plain.to(dtype).save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        tok.save_pretrained(d)
        out[kind] = d
    return out


@pytest.fixture(scope="module")
def st_bf16(smollm2_checkpoints):
    m = lstream.load(str(smollm2_checkpoints["bf16"]), n_ctx=1024)
    yield m
    m.close()


@pytest.fixture(scope="module")
def hf_bf16(smollm2_checkpoints):
    from transformers import AutoModelForCausalLM
    # bf16 weights, float32 math: the values lstream computes with
    return AutoModelForCausalLM.from_pretrained(smollm2_checkpoints["bf16"], dtype=torch.float32).eval()


def test_same_tokenizer_and_chat_template(st_bf16, smollm2):
    text = (DATA / "declaration.txt").read_text()
    assert st_bf16.tokenize(text) == smollm2.tokenize(text)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert st_bf16.tokenizer.apply_chat(msgs) == smollm2.tokenizer.apply_chat(msgs)
    assert st_bf16.tokenizer.eos_ids >= {2}
    assert st_bf16.loaded.format == "safetensors" and st_bf16.config.rope_mode == "neox"


def test_residency_map_matches_gguf(st_bf16, smollm2):
    a = {e.name: (e.layer, e.shape, e.alias_of) for e in st_bf16.residency}
    b = {e.name: (e.layer, e.shape, e.alias_of) for e in smollm2.residency}
    assert a == b


def test_greedy_64_equals_transformers(st_bf16, hf_bf16):
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = st_bf16.tokenize(st_bf16.tokenizer.apply_chat(msgs), bos=False)
    st_bf16.reset()
    ours = list(st_bf16.generate_tokens(ids, 64, stop_at_eos=False))
    st_bf16.reset()
    with torch.no_grad():
        ref = hf_bf16.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64,
                               do_sample=False)[0, len(ids):].tolist()
    print(f"\n{st_bf16.tokenizer.decode(ours)!r}")
    assert ours == ref


@pytest.fixture(scope="module")
def bf16_ppl(st_bf16):
    return st_bf16.perplexity((DATA / "declaration.txt").read_text(), n_ctx=PPL_CTX)


def test_perplexity_within_half_percent_of_gguf(bf16_ppl, smollm2):
    text = (DATA / "declaration.txt").read_text()
    ours = bf16_ppl
    ref = smollm2.perplexity(text, n_ctx=PPL_CTX)
    print(f"\nppl safetensors bf16 {ours.ppl:.4f} gguf Q4_1 {ref.ppl:.4f} ({ours.ppl / ref.ppl - 1:+.3%}) "
          f"over {ours.n_tokens_scored} tokens")
    assert abs(ours.ppl / ref.ppl - 1) < 0.005


def test_f32_and_sharded(smollm2_checkpoints, st_bf16, hf_smollm2):
    d = smollm2_checkpoints["sharded"]
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 1
    ids = st_bf16.tokenize((DATA / "declaration.txt").read_text())[:48]
    st_bf16.reset()
    whole = st_bf16.eval(ids, logits="all")
    st_bf16.reset()
    with lstream.load(str(d), n_ctx=256) as m:
        assert len({e.source for e in m.residency}) > 1
        np.testing.assert_array_equal(m.eval(ids, logits="all"), whole)
    with lstream.load(str(smollm2_checkpoints["f32"]), n_ctx=256, load_tokenizer=False) as m:
        ours = m.eval(ids, logits="all")
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    nmse = ((ours - ref) ** 2).sum() / (ref ** 2).sum()
    print(f"\nf32 checkpoint vs transformers: nmse {nmse:.2e} max abs {np.abs(ours - ref).max():.2e}")
    assert nmse < 1e-8


def test_quantize_q8_0_on_load(smollm2_checkpoints, st_bf16, bf16_ppl):
    import time
    text = (DATA / "declaration.txt").read_text()
    t0 = time.perf_counter()
    with lstream.load(str(smollm2_checkpoints["bf16"]), n_ctx=1024, load_tokenizer=False, quantize="q8_0") as m:
        load_s = time.perf_counter() - t0
        m.tokenizer = st_bf16.tokenizer
        q = m.perplexity(text, n_ctx=PPL_CTX)
        print(f"\n{m.quantize_report.line()}; load {load_s:.1f} s")
    ref = bf16_ppl
    print(f"ppl q8_0 {q.ppl:.4f} bf16 {ref.ppl:.4f} ({q.ppl / ref.ppl - 1:+.3%})")
    assert abs(q.ppl / ref.ppl - 1) < 0.01
