"""The entry point that picks a loader by the path, and the checks every loader's result passes."""
from __future__ import annotations

import time
from pathlib import Path

from ..core.errors import ModelFormatError
from ..core.residency import TensorEntry
from .loaded import BUILTIN_CHAT_TEMPLATES, LoadedModel  # noqa: F401  (LoadedModel: also imported from here)


def _check_config(model: LoadedModel) -> None:
    """Hyper-parameters that size loops and buffers: positive, bounded by the tensors present."""
    cfg, n_tensors = model.config, len(list(model.residency))
    for key in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "rope_dim"):
        v = getattr(cfg, key)
        if type(v) is not int or v < 1 or v >= 1 << 31:
            raise ModelFormatError(model.path, f"config {key}: expected a positive integer, found {v!r}")
    if cfg.n_layer > n_tensors:
        raise ModelFormatError(model.path, f"config n_layer: expected at most one layer per tensor "
                                           f"({n_tensors} tensors), found {cfg.n_layer}")
    if cfg.n_head % cfg.n_head_kv:
        raise ModelFormatError(model.path, f"config n_head_kv: expected a divisor of n_head {cfg.n_head}, "
                                           f"found {cfg.n_head_kv}")
    if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        raise ModelFormatError(model.path, f"config rope_dim: expected an even number up to head_dim "
                                           f"{cfg.head_dim}, found {cfg.rope_dim}")


def _check_layer_shapes(model: LoadedModel) -> None:
    """Every layer's tensors against the config (finish() checks layer 0 first, by name)."""
    cfg, rmap = model.config, model.residency
    E, Q, KV, F = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.n_ff
    want = {"output_norm.weight": (E,), "output.weight": (cfg.vocab_size, E)}
    for il in range(cfg.n_layer):
        for n, shape in (("attn_norm", (E,)), ("attn_q", (Q, E)), ("attn_k", (KV, E)), ("attn_v", (KV, E)),
                         ("attn_output", (E, Q)), ("ffn_norm", (E,)), ("ffn_gate", (F, E)), ("ffn_up", (F, E)),
                         ("ffn_down", (E, F))):
            want[f"blk.{il}.{n}.weight"] = shape
    if cfg.n_expert:  # experts (n_expert, rows, cols) and the router (n_expert, n_embd)
        X, FX = cfg.n_expert, cfg.n_ff_exp
        for il in range(cfg.n_layer):
            for n, shape in (("ffn_gate_inp", (X, E)), ("ffn_gate_exps", (X, FX, E)), ("ffn_up_exps", (X, FX, E)),
                             ("ffn_down_exps", (X, E, FX))):
                want[f"blk.{il}.{n}.weight"] = shape
    for name, shape in want.items():
        if name in rmap and tuple(rmap[name].shape) != shape:
            raise ModelFormatError(model.path, f"tensor {name}: expected shape {shape} from the config, "
                                               f"found {tuple(rmap[name].shape)}")


def finish(model: LoadedModel) -> LoadedModel:
    """Checks shared by all loaders: required tensors present, shapes agree with the config;
    the tied output head becomes an alias entry so -ngl can place it as llama.cpp does."""
    from ..core.arch import BUILDERS
    cfg, rmap = model.config, model.residency
    if cfg.arch not in BUILDERS:
        raise ModelFormatError(model.path, f"unsupported architecture {cfg.arch!r}: expected one of "
                                           + ", ".join(sorted(BUILDERS)))
    _check_config(model)
    need = ["token_embd.weight", "output_norm.weight"]
    for il in range(cfg.n_layer):
        # a layer with a router has experts where a dense one has its FFN
        ffn = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") if f"blk.{il}.ffn_gate_inp.weight" in rmap \
            else ("ffn_gate", "ffn_up", "ffn_down")
        need += [f"blk.{il}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_norm", *ffn)]
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
    if "blk.0.ffn_gate.weight" not in rmap:  # a MoE layer 0: its experts are checked per layer below
        del checks["blk.0.ffn_gate.weight"]
    if any(e.n_expert for e in rmap) and not (cfg.n_expert and cfg.n_expert_used):
        raise ModelFormatError(model.path, "expert tensors found, but the config gives no expert_count and "
                                           "expert_used_count")
    if cfg.n_expert_used > cfg.n_expert or cfg.n_expert_used < 0:
        raise ModelFormatError(model.path, f"config expert_used_count: expected 0..{cfg.n_expert} (expert_count), "
                                           f"found {cfg.n_expert_used}")
    for name, want in checks.items():
        got = rmap[name].shape
        if name == "token_embd.weight" and got[1] == want[1]:
            cfg.vocab_size = got[0]  # vocab from the tensor when metadata disagrees (padded vocabularies)
            continue
        if tuple(got) != want:
            raise ModelFormatError(model.path, f"tensor {name}: expected shape {want} from the config, found {tuple(got)}")
    _check_layer_shapes(model)
    if model.chat_template is None and cfg.arch in BUILTIN_CHAT_TEMPLATES:
        model.chat_template = BUILTIN_CHAT_TEMPLATES[cfg.arch]
        model.metadata["lstream.chat_template"] = f"built-in {cfg.arch} template (the file has none)"
    if "output.weight" not in rmap:
        e = rmap["token_embd.weight"]
        rmap.add(TensorEntry("output.weight", cfg.n_layer, e.shape, e.qtype, e.nbytes, e.data,
                             state=e.state, source=e.source, alias_of=e.name))
    return model


def load_model(path, quantize: str | None = None) -> LoadedModel:
    """A .gguf file (or the first part of a split one) or a Hugging Face safetensors directory;
    quantize ("q8_0", "q4_0"): float weights become GGUF blocks in host memory."""
    if quantize:
        from .quantize import quantize_model
        model = load_model(path)
        quantize_model(model, quantize)
        return model
    t0 = time.perf_counter()
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(p, "no such file or directory")
    if p.is_dir() or p.suffix == ".safetensors":
        from .safetensors import load_safetensors
        model = finish(load_safetensors(p if p.is_dir() else p.parent))
    else:
        from .gguf import load_gguf
        model = finish(load_gguf(p))
    model.load_s = time.perf_counter() - t0
    return model
