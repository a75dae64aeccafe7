"""End to end on the real model: lstream's logits against transformers loading the same GGUF."""
from __future__ import annotations

import numpy as np
import torch

N_TOKENS = 512  # acceptance asks for 256 or more tokens of real text


def _nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    lg = logits.astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (np.log(np.exp(lg - m).sum(-1, keepdims=True)) + m)[:, 0]
    return lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]


def test_logits_match_transformers(smollm2, hf_smollm2, text_tokens):
    ids = text_tokens[:N_TOKENS]
    assert len(ids) == N_TOKENS
    smollm2.reset()
    ours = smollm2.eval(ids, logits="all")
    smollm2.reset()
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    ppl_ours, ppl_ref = np.exp(_nll(ours, ids).mean()), np.exp(_nll(ref, ids).mean())
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    nmse = ((ours - ref) ** 2).sum() / (ref ** 2).sum()
    print(f"\nppl lstream {ppl_ours:.4f} transformers {ppl_ref:.4f} top-1 {top1:.4f} nmse {nmse:.2e}")
    assert abs(ppl_ours / ppl_ref - 1) < 0.01
    assert top1 >= 0.95
    assert nmse < 1e-3


def test_ubatch_split_and_cache_give_same_logits(smollm2, text_tokens):
    """Prefill in one ubatch vs in several ubatches plus a decode step: same final logits."""
    ids = text_tokens[:100]
    smollm2.reset()
    whole = smollm2.eval(ids)
    smollm2.reset()
    old = smollm2.n_ubatch
    smollm2.n_ubatch = 32
    try:
        smollm2.eval(ids[:-1])
        step = smollm2.eval(ids[-1:])
    finally:
        smollm2.n_ubatch = old
        smollm2.reset()
    assert np.argmax(whole) == np.argmax(step)
    np.testing.assert_allclose(step, whole, rtol=0, atol=2e-2 * np.abs(whole).max())


def test_greedy_completion_is_paris(smollm2):
    out = smollm2.generate("The capital of France is", n_predict=16, temp=0)
    print(repr(out))
    assert "Paris" in out


def test_chat_answer_matches_transformers_greedy(smollm2, hf_smollm2):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ours = smollm2.chat(msgs, n_predict=24, sampler=None)
    prompt = smollm2.tokenizer.apply_chat(msgs)
    ids = smollm2.tokenize(prompt, bos=False)
    with torch.no_grad():
        out = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=list(smollm2.tokenizer.eos_ids))
    ref_ids = [t for t in out[0, len(ids):].tolist() if t not in smollm2.tokenizer.eos_ids]
    ref = smollm2.tokenizer.decode(ref_ids)
    print(repr(ours), repr(ref))
    assert "Paris" in ours
    assert ours == ref
