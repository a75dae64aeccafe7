"""The tokenizer converted from a GGUF file, cached as a Hugging Face tokenizer folder.

$LSTREAM_CACHE/tokenizers/<file name>-<12 hex digits of its absolute path>/ holds what
transformers' save_pretrained writes (tokenizer.json, tokenizer_config.json, chat_template.jinja)
and lstream-tokenizer.json, the manifest: what the folder was made from (the GGUF file's absolute
path, size, mtime and the sha256 of its first MiB; the transformers and tokenizers versions), the
sha256 of every other file in the folder, and what lstream needs beside tokenizer.json (eos id,
vocabulary size, special tokens, chat template).

A folder is used only when its manifest matches the file and the installed libraries and every
file matches its digest; anything else (stale, truncated, edited, unreadable) makes the caller
convert the tokenizer again, and the new folder replaces the old one. A cache that cannot be
written costs the conversion on every load, with no error."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "lstream-tokenizer.json"
FORMAT = 1
HEAD_BYTES = 1 << 20  # the header's start: magic, metadata keys, the vocabulary's first tokens


def root() -> Path:
    from .registry import cache_dir
    return cache_dir() / "tokenizers"


def folder(path: Path) -> Path:
    """The cache folder of the GGUF file at `path` (one per file, whatever its version)."""
    real = os.path.realpath(path)
    return root() / f"{Path(real).name}-{hashlib.sha256(real.encode()).hexdigest()[:12]}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def identity(path: Path) -> dict:
    """What a cached tokenizer was made from; a different one means the cache is stale."""
    import importlib.metadata

    import tokenizers
    real = os.path.realpath(path)
    st = os.stat(real)
    with open(real, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    return {"format": FORMAT, "source": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_sha256": _sha256(head), "transformers": importlib.metadata.version("transformers"),
            "tokenizers": tokenizers.__version__}


def load(path: Path):
    """(tokenizers.Tokenizer, info, folder) of the cached tokenizer of `path`, or None (no cache, a
    stale or corrupt one)."""
    d = folder(path)
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("identity") != identity(path):
            return None
        files, info = manifest["files"], manifest["info"]
        if "tokenizer.json" not in files or not isinstance(info, dict):
            return None
        data = {}
        for name, digest in files.items():
            data[name] = (d / name).read_bytes()
            if _sha256(data[name]) != digest:
                return None
        import tokenizers
        tok = tokenizers.Tokenizer.from_str(data["tokenizer.json"].decode("utf-8"))
        return tok, info, str(d)
    except Exception:  # missing, unreadable, not JSON, not a tokenizer: converted again
        return None


def save(path: Path, hf, info: dict) -> str | None:
    """Save transformers tokenizer `hf` (converted from `path`) as the cache folder of `path`,
    atomically (written beside it, then renamed): the folder, or None when the cache cannot be written."""
    d = folder(path)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
    except OSError:
        return None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    except OSError:
        pass
    try:
        hf.save_pretrained(str(tmp))
        files = {p.name: _sha256(p.read_bytes()) for p in sorted(tmp.iterdir()) if p.is_file()}
        if "tokenizer.json" not in files:
            return None
        manifest = {"identity": identity(path), "files": files, "info": info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        return str(d) if _install(tmp, d) else None
    except (OSError, TypeError, ValueError):
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, d: Path) -> bool:
    """Rename the finished folder `tmp` to `d`, replacing a stale `d`."""
    try:
        os.rename(tmp, d)
        return True
    except OSError:
        pass  # d exists: a stale folder, or one another process just installed
    trash = None
    try:
        trash = Path(tempfile.mkdtemp(prefix=".old-", dir=d.parent))
        os.rename(d, trash / d.name)
        os.rename(tmp, d)
        return True
    except OSError:
        return False
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
