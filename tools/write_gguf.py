"""Write a loaded llama-family model (dense or mixture of experts) as a GGUF file the way llama.cpp's
converter lays it out: canonical tensor names, experts as 3-D ffn_{gate,up,down}_exps tensors, q/k
permuted to adjacent pairs for the `llama` architecture (Mixtral), the router and the norms float32,
the other matrices F32 or quantized (Q8_0, Q4_0: loaders/quantize.py, bit-exact with ggml).

    python -m lstream.tools.write_gguf path/to/hf_dir out.gguf --type Q8_0

No tokenizer is written (tests load with load_tokenizer=False).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lstream.core.qtypes import QType
from lstream.loaders.quantize import QUANTIZE_TYPES, quantize_rows, to_float32

_KEEP_FLOAT = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")  # routers stay float (llama.cpp)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf: HF halves layout -> adjacent pairs per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float(e) -> np.ndarray:
    if e.n_expert:
        return np.stack([to_float32(e.qtype, e.expert(x)).reshape(e.shape[1:]) for x in range(e.n_expert)])
    return to_float32(e.qtype, e.data).reshape(e.shape)


def _metadata(w, cfg) -> None:
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_rope_dimension_count(cfg.rope_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.n_expert:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_used)
        w.add_expert_weights_norm(bool(cfg.expert_norm))
        if cfg.arch != "llama":  # Mixtral's experts are feed_forward_length wide
            w.add_expert_feed_forward_length(cfg.n_ff_exp)
    if cfg.bos_id is not None:
        w.add_bos_token_id(int(cfg.bos_id))
    for e in cfg.eos_ids[:1]:
        w.add_eos_token_id(int(e))


def write_gguf(loaded, path, qtype: str = "F32") -> Path:
    """A LoadedModel (loaders.model_file.load_model) as a GGUF file: F32, or Q8_0/Q4_0 matrices."""
    import gguf
    cfg, path = loaded.config, Path(path)
    if cfg.arch.startswith("gemma"):
        raise ValueError("write_gguf: gemma norms (1 + w) are not converted; llama-family only")
    quant = None if qtype.upper() == "F32" else QUANTIZE_TYPES[qtype.lower()]
    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_name(cfg.name or path.stem)
    _metadata(w, cfg)
    for e in loaded.residency:
        if e.alias_of is not None:
            continue  # a tied head: llama.cpp writes none
        a = _float(e)
        if cfg.arch == "llama" and e.name.endswith(("attn_q.weight", "attn_k.weight")):
            a = _permute(a, cfg.n_head if "attn_q" in e.name else cfg.n_head_kv)
        if quant is None or a.ndim < 2 or a.shape[-2] == 1 or e.name.endswith(_KEEP_FLOAT) or a.shape[-1] % 32:
            w.add_tensor(e.name, np.ascontiguousarray(a, dtype=np.float32))
            continue
        rows = a.reshape(-1, a.shape[-1])
        blocks = quantize_rows(quant, QType.F32, rows, rows.shape[0], rows.shape[1])
        w.add_tensor(e.name, blocks.reshape(*a.shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType(int(quant)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> None:
    from lstream.loaders.model_file import load_model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="a safetensors directory or GGUF file")
    ap.add_argument("out")
    ap.add_argument("--type", default="F32", choices=["F32", "Q8_0", "Q4_0"])
    a = ap.parse_args(argv)
    write_gguf(load_model(a.src), a.out, a.type)


if __name__ == "__main__":
    main()
