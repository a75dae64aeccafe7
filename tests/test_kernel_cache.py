"""backends/cpu/kernel_cache.py: numba's cached kernels are dropped when any CPU kernel source changes
(numba itself checks only the defining file, not the intrinsics it inlines from others)."""
from __future__ import annotations

from lstream.backends.cpu.kernel_cache import STAMP, drop_stale


def test_cached_kernels_dropped_when_a_source_changes(tmp_path):
    (tmp_path / "kernels.py").write_text("x = 1\n")
    (tmp_path / "intrinsics.py").write_text("y = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / "kernels.f-1.py311.nbi").write_bytes(b"index")
    (cache / "kernels.f-1.py311.1.nbc").write_bytes(b"code")
    (cache / "kernels.cpython-311.pyc").write_bytes(b"pyc")
    assert drop_stale(tmp_path)  # no stamp yet: whatever is cached may be stale
    assert sorted(p.name for p in cache.iterdir()) == sorted([STAMP, "kernels.cpython-311.pyc"])
    (cache / "kernels.f-1.py311.nbi").write_bytes(b"index")  # compiled again
    assert not drop_stale(tmp_path)  # same sources: kept
    assert (cache / "kernels.f-1.py311.nbi").exists()
    (tmp_path / "intrinsics.py").write_text("y = 2\n")  # another file than the kernel's own
    assert drop_stale(tmp_path)
    assert not (cache / "kernels.f-1.py311.nbi").exists()
