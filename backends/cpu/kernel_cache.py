"""numba's on-disk cache checks only the file that defines a function, so a kernel whose LLVM IR comes
from another file (an @intrinsic in nib_half.py, blocks.py, llvm_ir.py, ...) would load stale
machine code after that file changed: after a git pull or an upgrade in place, an int8 activation
layout and the dot reading it could disagree. So before any kernel loads, the package's cached
kernels are dropped whenever any of its sources changed since they were cached."""
from __future__ import annotations

import hashlib
from pathlib import Path

STAMP = "lstream-kernels.stamp"


def sources_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def drop_stale(folder: Path | None = None) -> bool:
    """Delete folder/__pycache__/*.nbi|*.nbc unless its stamp matches the sources; True if dropped."""
    folder = folder or Path(__file__).parent
    cache, digest = folder / "__pycache__", sources_digest(folder)
    stamp = cache / STAMP
    try:
        if stamp.read_text() == digest:
            return False
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        stamp.write_text(digest)
    except OSError:  # a read-only install: numba caches elsewhere, or not at all
        return False
    return True
