"""What every loader returns, and the entry point that picks a loader by the path."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import ModelConfig
from ..core.errors import ModelFormatError
from ..core.residency import ResidencyMap, TensorEntry


@dataclass
class LoadedModel:
    path: Path
    format: str  # "gguf" or "safetensors"
    config: ModelConfig
    residency: ResidencyMap
    tokenizer_source: tuple[str, str | None]  # (directory, gguf file name or None)
    metadata: dict = field(default_factory=dict)
    chat_template: str | None = None
    handle: Any = None  # keeps the memory map alive

    @property
    def file_size(self) -> int:
        return self.residency.total_bytes()

    @property
    def n_params(self) -> int:
        n = 0
        for e in self.residency:
            if e.alias_of is None:
                c = 1
                for d in e.shape:
                    c *= d
                n += c
        return n


def finish(model: LoadedModel) -> LoadedModel:
    """Checks shared by all loaders: required tensors present, shapes agree with the config;
    the tied output head becomes an alias entry so -ngl can place it as llama.cpp does."""
    from ..core.arch import BUILDERS
    cfg, rmap = model.config, model.residency
    if cfg.arch not in BUILDERS:
        raise ModelFormatError(model.path, f"unsupported architecture {cfg.arch!r}: expected one of "
                                           + ", ".join(sorted(BUILDERS)))
    need = ["token_embd.weight", "output_norm.weight"]
    for il in range(cfg.n_layer):
        need += [f"blk.{il}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    if cfg.arch.startswith("gemma"):
        need = [n for n in need if not n.endswith("ffn_norm.weight")]
    missing = [n for n in need if n not in rmap]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelFormatError(model.path, f"tensor {missing[0]}{more} missing for architecture {cfg.arch}")
    checks = {"token_embd.weight": (cfg.vocab_size, cfg.n_embd),
              "blk.0.attn_q.weight": (cfg.n_head * cfg.head_dim, cfg.n_embd),
              "blk.0.attn_k.weight": (cfg.n_head_kv * cfg.head_dim, cfg.n_embd),
              "blk.0.ffn_gate.weight": (cfg.n_ff, cfg.n_embd)}
    for name, want in checks.items():
        got = rmap[name].shape
        if name == "token_embd.weight" and got[1] == want[1]:
            cfg.vocab_size = got[0]  # vocab from the tensor when metadata disagrees (padded vocabularies)
            continue
        if tuple(got) != want:
            raise ModelFormatError(model.path, f"tensor {name}: expected shape {want} from the config, found {tuple(got)}")
    if "output.weight" not in rmap:
        e = rmap["token_embd.weight"]
        rmap.add(TensorEntry("output.weight", cfg.n_layer, e.shape, e.qtype, e.nbytes, e.data,
                             state=e.state, source=e.source, alias_of=e.name))
    return model


def load_model(path) -> LoadedModel:
    """A .gguf file (or the first part of a split one) or a Hugging Face safetensors directory."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(p, "no such file or directory")
    if p.is_dir():
        from .safetensors import load_safetensors
        return finish(load_safetensors(p))
    if p.suffix == ".safetensors":
        from .safetensors import load_safetensors
        return finish(load_safetensors(p.parent))
    from .gguf import load_gguf
    return finish(load_gguf(p))
