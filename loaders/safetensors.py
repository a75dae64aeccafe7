"""Hugging Face checkpoint loader: config.json through transformers' AutoConfig, weights from
model.safetensors (or shards listed in model.safetensors.index.json), memory-mapped."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..core.config import ModelConfig
from ..core.errors import ModelFormatError
from ..core.qtypes import QType, tensor_bytes
from ..core.residency import ResidencyMap, State, TensorEntry
from .experts import ExpertGather
from .loaded import LoadedModel
from .names import canonical_from_hf, layer_of

DTYPES = {"F32": (QType.F32, np.float32), "F16": (QType.F16, np.float16), "BF16": (QType.BF16, np.uint8)}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "gemma3_text": "gemma3", "gemma3": "gemma3",
        "mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}  # llama.cpp names Mixtral llama
# Bytes per value of every dtype the safetensors format defines (lstream computes with DTYPES only).
ST_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                  "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def _unique(file: Path, pairs: list) -> dict:
    """json.loads keeps the last of duplicate keys silently; a header must not have any."""
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ModelFormatError(file, f"duplicate tensor name {k} in the header")
        seen.add(k)
    return dict(pairs)


def _check_entries(file: Path, start: int, size: int, header: dict) -> None:
    """Every tensor entry well-formed, inside the file and apart from the others, before any is used."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("shape"), list) and \
            isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 and \
            all(type(x) is int and x >= 0 for x in info["shape"] + info["data_offsets"])
        if not ok:
            raise ModelFormatError(file, f"tensor {name}: expected {{dtype, shape, data_offsets: [begin, end]}} of "
                                         f"non-negative integers, found {json.dumps(info)[:80]}")
        dtype, shape, (b, e) = info.get("dtype"), info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPE_SIZES:
            raise ModelFormatError(file, f"unsupported dtype {str(dtype)[:20]} for {name}: expected F32, F16 or BF16")
        n = ST_DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        if min(shape, default=1) < 1 or e < b or e - b != n:
            raise ModelFormatError(file, f"tensor {name}: expected {n} bytes for {dtype} {tuple(shape)} (positive "
                                         f"dimensions), found offsets {b}..{e}")
        if start + e > size:
            raise ModelFormatError(file, f"truncated: tensor {name} ends at byte {start + e}, file has {size}")
        spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelFormatError(file, f"tensors {n0} and {n1} overlap: expected {n1} to start at byte "
                                         f"{e0} or later, found {b1}")


def _config(path: Path) -> ModelConfig:
    from transformers import AutoConfig
    if not (path / "config.json").exists():
        raise ModelFormatError(path, "not a model directory: expected config.json")
    try:
        hf = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a bad config
        raise ModelFormatError(path / "config.json", f"unreadable config ({type(e).__name__}: {e})") from None
    hf = getattr(hf, "text_config", None) or hf
    arch = ARCH.get(hf.model_type)
    if arch is None:
        raise ModelFormatError(path, f"unsupported architecture {hf.model_type!r}: expected one of "
                                     + ", ".join(sorted(ARCH)))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    eos = hf.eos_token_id if isinstance(hf.eos_token_id, (list, tuple)) else [hf.eos_token_id]
    scaling = dict(getattr(hf, "rope_scaling", None) or {})
    rope_base = getattr(hf, "rope_theta", None) or (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    n_expert = int(getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None) or 0)
    return ModelConfig(
        arch=arch, n_layer=hf.num_hidden_layers, n_embd=hf.hidden_size, n_ff=hf.intermediate_size,
        n_expert=n_expert, n_expert_used=int(getattr(hf, "num_experts_per_tok", 0) or 0) if n_expert else 0,
        n_ff_exp=int(getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size) if n_expert else 0,
        expert_norm=bool(getattr(hf, "norm_topk_prob", True)),  # Mixtral has none: softmax over the top-k
        n_head=hf.num_attention_heads, n_head_kv=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim, vocab_size=hf.vocab_size, n_ctx_train=getattr(hf, "max_position_embeddings", 4096),
        rms_eps=getattr(hf, "rms_norm_eps", 1e-6), rope_base=float(rope_base),
        rope_mode="neox", rope_scaling=scaling,
        bos_id=getattr(hf, "bos_token_id", None), eos_ids=tuple(e for e in eos if e is not None),
        name=path.name, extra=hf.to_dict(),
    )


def _header(file: Path) -> tuple[int, dict]:
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelFormatError(file, f"truncated safetensors header: expected 8 bytes, found {len(raw)}")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ModelFormatError(file, f"header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(fh.read(n), object_pairs_hook=lambda pairs: _unique(file, pairs))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(file, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(file, "header is not a JSON object")
    _check_entries(file, 8 + n, size, header)
    return 8 + n, header


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ModelFormatError(index, f"bad index file ({e})") from None
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
        if bad:
            raise ModelFormatError(index, f"expected shard file names in the model directory, found {bad[0]!r}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(path, "no model.safetensors or model.safetensors.index.json")
    return files


def load_safetensors(path: Path) -> LoadedModel:
    path = Path(path)
    try:
        cfg = _config(path)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, OverflowError) as e:
        raise ModelFormatError(path / "config.json", f"expected numbers for the hyper-parameters, found "
                                                     f"{type(e).__name__}: {e}") from None
    rmap = ResidencyMap(cfg.n_layer)
    maps = []
    experts = ExpertGather()
    for file in _shards(path):
        if not file.exists():
            raise ModelFormatError(file, "shard listed in the index is missing")
        start, header = _header(file)
        size = file.stat().st_size
        mm = np.memmap(file, dtype=np.uint8, mode="r")
        maps.append(mm)
        spans = []
        for hf_name, info in header.items():
            if hf_name == "__metadata__":
                continue
            canon = canonical_from_hf(hf_name, cfg.arch)
            expert = canon is None and experts.matches(hf_name)
            if canon is None and not expert:
                continue  # e.g. rotary inv_freq buffers
            dtype = info.get("dtype")
            if dtype not in DTYPES:
                raise ModelFormatError(file, f"unsupported dtype {dtype} for {hf_name}: expected F32, F16 or BF16")
            qtype, np_dtype = DTYPES[dtype]
            shape = tuple(int(d) for d in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
            nbytes = tensor_bytes(qtype, shape) if shape else 0
            if e - b != nbytes or start + e > size:
                raise ModelFormatError(file, f"tensor {hf_name}: offsets {b}..{e} do not hold {dtype} {shape} "
                                             f"within {size} bytes")
            spans.append((b, e, hf_name))
            if expert:  # gathered into the layer's 3-D expert tensors once every shard is read
                experts.add(hf_name, mm[start + b:start + e], shape, qtype, np_dtype, file)
                continue
            data = mm[start + b:start + e]
            data = data.view(np_dtype).reshape(shape) if np_dtype is not np.uint8 else \
                data.reshape(shape[0] if len(shape) > 1 else 1, -1)
            if canon in rmap:
                raise ModelFormatError(file, f"duplicate tensor {hf_name}")
            state = State.MAPPED
            if cfg.arch.startswith("gemma") and canon.endswith("norm.weight"):
                # Gemma scales by (1 + w); canonical (GGUF) norm weights hold 1 + w already.
                from .quantize import to_float32
                data = to_float32(qtype, data).reshape(shape) + np.float32(1)
                qtype, nbytes, state = QType.F32, data.nbytes, State.HOST
            rmap.add(TensorEntry(canon, layer_of(canon, cfg.n_layer), shape, qtype, nbytes, data,
                                 state=state, source=str(file)))
        spans.sort()
        for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ModelFormatError(file, f"tensors {n0} and {n1} overlap")
    experts.finish(rmap, path)
    template = None
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists():
        try:
            template = json.loads(tok_cfg.read_text()).get("chat_template")
        except json.JSONDecodeError:
            template = None
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    return LoadedModel(path=path, format="safetensors", config=cfg, residency=rmap,
                       tokenizer_source=(str(path), None), metadata={"general.architecture": cfg.arch},
                       chat_template=template, handle=maps)
