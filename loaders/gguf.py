"""GGUF loader: gguf.GGUFReader over a memory map; tensors stay zero-copy views of the file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.config import ModelConfig
from ..core.errors import ModelFormatError
from ..core.qtypes import QTYPE_INFO, QType, tensor_bytes
from ..core.residency import ResidencyMap, State, TensorEntry
from .names import layer_of
from .model_file import LoadedModel

# Types the engine computes with; others are rejected at load with a clear message.
SUPPORTED_QTYPES = frozenset({QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0,
                              QType.Q5_1, QType.Q8_0, QType.Q4_K, QType.Q5_K, QType.Q6_K})
NEOX_ARCHS = {"qwen2", "qwen3", "gemma3", "gemma2", "phi3"}  # rotate halves; llama rotates pairs
GGUF_MAGIC = b"GGUF"


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _open(path: Path):
    import gguf
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise ModelFormatError(path, f"cannot read file: {e.strerror}") from None
    if head[:4] != GGUF_MAGIC:
        raise ModelFormatError(path, f"not a GGUF file: expected magic b'GGUF', found {head[:4]!r}")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if version not in (2, 3):
        raise ModelFormatError(path, f"unsupported GGUF version: expected 2 or 3, found {version}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, OverflowError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFormatError(path, f"malformed or truncated GGUF header ({e})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFormatError(path, f"truncated: tensor {t.name} ends at byte {end}, file has {size}")
    return reader


def config_from_gguf(path: Path, reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelFormatError(path, "no general.architecture in metadata")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelFormatError(path, f"missing metadata {arch}.{key}")
        return v

    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None) \
        or (int(emb.shape[1]) if emb is not None else 0)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    extra = {k.split(".", 1)[1]: _field(reader, k) for k in reader.fields if k.startswith(arch + ".")}
    return ModelConfig(
        arch=arch, n_layer=int(need("block_count")), n_embd=n_embd, n_ff=int(need("feed_forward_length")),
        n_head=n_head, n_head_kv=int(n_head_kv), head_dim=head_dim, vocab_size=int(vocab),
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 4096)),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        rope_mode="neox" if arch in NEOX_ARCHS else "norm",
        bos_id=None if bos is None else int(bos),
        eos_ids=tuple(int(x) for x in (eos, eot) if x is not None),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        name=str(_field(reader, "general.name", path.stem)),
        extra=extra,
    )


def load_gguf(path: Path) -> LoadedModel:
    path = Path(path)
    reader = _open(path)
    cfg = config_from_gguf(path, reader)
    rmap = ResidencyMap(cfg.n_layer)
    for t in reader.tensors:
        try:
            qtype = QType(int(t.tensor_type))
        except ValueError:
            qtype = None
        if qtype not in SUPPORTED_QTYPES:
            tname = getattr(t.tensor_type, "name", str(int(t.tensor_type)))
            raise ModelFormatError(path, f"unsupported tensor type {tname} for {t.name}: expected one of "
                                         + ", ".join(q.name for q in sorted(SUPPORTED_QTYPES)))
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        while len(shape) > 2 and shape[0] == 1:
            shape = shape[1:]
        block = QTYPE_INFO[qtype].block_size
        if shape[-1] % block:
            raise ModelFormatError(path, f"tensor {t.name}: row of {shape[-1]} values is not a multiple of "
                                         f"the {qtype.name} block ({block})")
        nbytes = tensor_bytes(qtype, shape)
        if nbytes != int(t.n_bytes):
            raise ModelFormatError(path, f"tensor {t.name}: expected {nbytes} bytes for {qtype.name} {shape}, "
                                         f"found {int(t.n_bytes)}")
        if t.name in rmap:
            raise ModelFormatError(path, f"duplicate tensor name {t.name}")
        data = t.data
        if qtype not in (QType.F32, QType.F16):
            data = data.reshape(shape[0] if len(shape) > 1 else 1, -1).view(np.uint8)
        rmap.add(TensorEntry(t.name, layer_of(t.name, cfg.n_layer), shape, qtype, nbytes, data,
                             state=State.MAPPED, source=str(path)))
    return LoadedModel(path=path, format="gguf", config=cfg, residency=rmap,
                       tokenizer_source=(str(path.parent), path.name),
                       metadata={k: _field(reader, k) for k in reader.fields
                                 if not k.startswith("tokenizer.ggml.") and not k.startswith("GGUF.")},
                       chat_template=_field(reader, "tokenizer.chat_template"), handle=reader)
