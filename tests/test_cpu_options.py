"""The CPU backend takes its switches from core.options.Options (no environment read at import), and
importing it leaves the process environment alone."""
from __future__ import annotations

import os
import subprocess
import sys

import numba
import pytest

from lstream.backends.cpu import CPUBackend, blocks
from lstream.backends.cpu.llvm_ir import HAVE_AVX2
from lstream.backends.cpu.matmul import BLAS_USABLE, NEVER
from lstream.core.batch import GEMM_MIN_TOKENS
from lstream.core.options import Options
from lstream.core.qtypes import QType


@pytest.fixture(autouse=True)
def _keep_numba_threads():
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


def test_n_threads_argument_wins_over_options():
    assert CPUBackend(1, Options(n_threads=2)).n_threads == 1
    assert CPUBackend(None, Options(n_threads=1)).n_threads == 1


def test_options_decide_blk_types_blas_programs_and_adaptive_threads():
    be = CPUBackend(1, Options(cpu_blk="all", blas_prefill=False, cpu_programs=False, adaptive_threads=True))
    assert be.blk_types == (frozenset(blocks.QTYPES) if HAVE_AVX2 else frozenset())
    assert not be.blas and be.gemm_min_tokens == NEVER
    assert not be.programs and be.adaptive_threads
    assert CPUBackend(1, Options(cpu_blk="none")).blk_types == frozenset()
    be = CPUBackend(1, Options())
    assert be.blas == BLAS_USABLE
    assert be.gemm_min_tokens == (GEMM_MIN_TOKENS if BLAS_USABLE else NEVER)
    assert be.blk_types <= {QType.Q8_0}


def test_environment_overrides_reach_the_backend_through_options(monkeypatch):
    monkeypatch.setenv("LSTREAM_CPU_PROGRAM", "0")
    monkeypatch.setenv("LSTREAM_CPU_BLK", "none")
    be = CPUBackend(1)
    assert not be.programs and be.blk_types == frozenset()


def test_import_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import os, lstream.backends.cpu as c, lstream.backends.cpu.matmul, lstream.backends.cpu.program; "
            "assert 'GOMP_SPINCOUNT' not in os.environ; c.CPUBackend(1); "
            "print(os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1000000"


def _sysfs(tmp_path, siblings):
    for cpu, sib in enumerate(siblings):
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(sib + "\n")
        (d / "core_id").write_text("0\n")  # a VM may number every vCPU core 0: not used
    return str(tmp_path)


def test_physical_cores_counts_sibling_sets(tmp_path, monkeypatch):
    from lstream.backends.cpu.backend import physical_cores
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert physical_cores(_sysfs(tmp_path / "smt", ["0,2", "1,3", "0,2", "1,3"])) == 2
    assert physical_cores(_sysfs(tmp_path / "vm", ["0", "1", "2", "3"])) == 4


def test_physical_cores_only_counts_allowed_cpus(tmp_path, monkeypatch):
    from lstream.backends.cpu.backend import physical_cores
    root = _sysfs(tmp_path, ["0", "1", "2", "3"])
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {1, 3})
    assert physical_cores(root) == 2
