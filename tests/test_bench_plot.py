"""tools/plot_bench.py: bench JSON/JSONL to PNG, one line per policy (skipped without matplotlib)."""
from __future__ import annotations

import json

import pytest

from lstream.tools import plot_bench


def rows():
    out = []
    for pol in ("threshold(32)", "never"):
        for ub in (64, 128, 256):
            for pp, tg in ((512, 0), (0, 128)):
                out.append(dict(model_type="llama 135M Q4_1", backends="CPU", cpu_info="x", gpu_info="",
                                n_gpu_layers=0, n_ubatch=ub, n_threads=2, n_batch=2048, threshold=32,
                                n_prompt=pp, n_gen=tg, n_depth=0, avg_ts=100.0 + ub, stddev_ts=1.0, policy=pol))
    return out


def test_series_one_line_per_policy_and_swept_axis():
    rs = rows()
    assert plot_bench.pick_x(rs) == "n_ubatch"
    s = plot_bench.series(rs, "n_ubatch")
    assert set(s) == {"pp512", "tg128"}
    assert set(s["pp512"]) == {"threshold(32)", "never"}
    assert [p[0] for p in s["pp512"]["never"]] == [64, 128, 256]


def test_png_from_json_and_jsonl(tmp_path):
    pytest.importorskip("matplotlib")
    js, jl = tmp_path / "b.json", tmp_path / "b.jsonl"
    js.write_text(json.dumps(rows()))
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    assert plot_bench.load_rows(str(jl)) == rows()
    out = tmp_path / "b.png"
    plot_bench.main([str(js), "-x", "ub", "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
