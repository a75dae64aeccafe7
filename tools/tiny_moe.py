"""Tiny random mixture-of-experts checkpoints made with transformers (Qwen3-MoE, Mixtral, Qwen2-MoE):
saved as safetensors, then written as GGUF (F32 and Q8_0) by tools/write_gguf.py, with transformers'
own float32 logits as the reference. For the MoE tests (CPU, fake device, GPU)."""
from __future__ import annotations

from pathlib import Path

ARCHS = ("qwen3moe", "mixtral", "qwen2moe")
GGUF_ARCH = {"qwen3moe": "qwen3moe", "mixtral": "llama", "qwen2moe": "qwen2moe"}
N_EXPERT, TOP_K = 8, 2


def make(arch: str, seed: int = 0, n_layer: int = 2, **over):
    """A tiny random transformers model (float32, eval) whose norms, biases and routers matter."""
    import torch
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
                  tie_word_embeddings=False, num_experts_per_tok=TOP_K)
    common.update(over)
    if arch == "qwen3moe":  # layer 1 dense (mlp_only_layers), the others MoE; head_dim != 64/4
        cfg = transformers.Qwen3MoeConfig(**{**dict(intermediate_size=96, moe_intermediate_size=32, num_experts=N_EXPERT,
                                                    norm_topk_prob=True, head_dim=32, mlp_only_layers=[1],
                                                    rope_theta=1e6), **common})
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(**{**dict(intermediate_size=64, num_local_experts=N_EXPERT,
                                                   rope_theta=1e6), **common})
        model = transformers.MixtralForCausalLM(cfg)
    elif arch == "qwen2moe":
        cfg = transformers.Qwen2MoeConfig(**{**dict(intermediate_size=96, moe_intermediate_size=32,
                                                    shared_expert_intermediate_size=64, num_experts=N_EXPERT,
                                                    norm_topk_prob=False, rope_theta=1e6), **common})
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny MoE architecture {arch!r}: expected one of {', '.join(ARCHS)}")
    model = model.float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them matter; routers decisive
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0.0, 0.5)
    return model


def write(arch: str, out: str | Path, n_tokens: int = 48, seed: int = 0, gguf_types=("F32", "Q8_0"), **over):
    """out/st (safetensors), out/<arch>-<type>.gguf; returns (dir, token ids, transformers' logits (T, vocab))."""
    import torch
    from lstream.loaders.model_file import load_model
    from lstream.tools.write_gguf import write_gguf
    out = Path(out)
    model = make(arch, seed, **over)
    model.save_pretrained(out / "st")
    loaded = load_model(out / "st")
    for t in gguf_types:
        write_gguf(loaded, out / f"{arch}-{t}.gguf", t)
    loaded.handle = None
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    return out, ids[0].tolist(), ref


def reference_from_gguf(arch: str, out: str | Path, gguf_file: str | Path, ids: list[int], seed: int = 0, **over):
    """transformers' logits with the weights a (quantized) GGUF holds, dequantized: what lstream must
    match up to its own arithmetic (int16 activations) on a quantized file."""
    import numpy as np
    import torch
    from lstream.loaders.model_file import load_model
    from lstream.loaders.names import canonical_from_hf, expert_from_hf, fused_experts_from_hf
    from lstream.backends.cpu.dequant import dequantize
    model = make(arch, seed, **over)
    g = load_model(gguf_file)
    rm, cfg = g.residency, g.config

    def deq(name, e=None):
        t = rm[name]
        data = t.data if e is None else t.expert(e)
        shape = t.shape if e is None else t.shape[1:]
        a = dequantize(t.qtype, np.asarray(data).reshape(int(np.prod(shape[:-1])) or 1, -1), t.n_cols).reshape(shape)
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):  # back to HF halves
            n = cfg.n_head if "attn_q" in name else cfg.n_head_kv
            a = a.reshape(n, a.shape[0] // n // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        return torch.from_numpy(np.array(a, dtype=np.float32))

    sd = model.state_dict()
    with torch.no_grad():
        for name, p in sd.items():
            canon, one, fused = canonical_from_hf(name, GGUF_ARCH[arch]), expert_from_hf(name), fused_experts_from_hf(name)
            if one is not None:
                p.copy_(deq(*one))
            elif fused is not None:
                il, kind = fused
                if kind == "down_proj":
                    p.copy_(torch.stack([deq(f"blk.{il}.ffn_down_exps.weight", e) for e in range(p.shape[0])]))
                else:
                    p.copy_(torch.stack([torch.cat([deq(f"blk.{il}.ffn_gate_exps.weight", e),
                                                    deq(f"blk.{il}.ffn_up_exps.weight", e)]) for e in range(p.shape[0])]))
            elif canon is not None and canon in rm:
                p.copy_(deq(canon).reshape(p.shape))
        g.handle = None
        return model(torch.tensor([ids])).logits[0].numpy()
