"""`lstream bench` on the real model with tiny sizes: formats load with llama-bench's field names,
ranges, -pg, -d, --progress, -v, Ctrl-C. Nothing here asserts a timing."""
from __future__ import annotations

import csv
import io
import json
import sqlite3

import click
import pytest
from click.testing import CliRunner

from lstream.cli.bench_params import parse_pairs, parse_values
from lstream.cli.main import cli

LLAMA_BENCH_FIELDS = ["model_filename", "model_type", "model_size", "model_n_params", "n_batch", "n_ubatch",
                      "n_threads", "n_gpu_layers", "no_op_offload", "n_prompt", "n_gen", "n_depth", "test_time",
                      "avg_ns", "stddev_ns", "avg_ts", "stddev_ts"]
LSTREAM_FIELDS = ["policy", "threshold", "bytes_streamed", "stream_gbps", "copy_hidden"]
TINY = ["bench", "-p", "8", "-n", "4", "-r", "2", "-t", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_model_for_the_module():
    """Every `lstream bench` below gets the same loaded model (loading dominates these tests);
    bench re-applies threads, ubatch and policy per combination, and its close() is a no-op here."""
    import lstream.api as engine
    import lstream.loaders.model_file as model_file
    from lstream.loaders.registry import resolve
    loaded = model_file.load_model(resolve(None))
    model = engine.Model(loaded, n_ctx=64, n_threads=1, load_tokenizer=False)
    model.close = lambda: None
    mp = pytest.MonkeyPatch()
    mp.setattr(model_file, "load_model", lambda path: loaded)
    mp.setattr(engine, "Model", lambda *a, **kw: model)
    yield model
    mp.undo()
    engine.Model.close(model)


def bench(*args, base=TINY):
    res = CliRunner().invoke(cli, [*base, *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_ranges_follow_llama_bench():
    assert parse_values("1,2", "-t") == [1, 2]
    assert parse_values("8-32*2", "-ub") == [8, 16, 32]
    assert parse_values("1-7+3", "-t") == [1, 4, 7]
    assert parse_values("0-3", "-ngl") == [0, 1, 2, 3]
    assert parse_pairs("512,128", "-pg") == [(512, 128)]
    with pytest.raises(click.BadParameter):
        parse_values("1-8*1", "-ub")
    with pytest.raises(click.BadParameter):
        parse_pairs("512", "-pg")


def test_json_and_csv_load_with_llama_bench_fields():
    res = bench("-o", "json", "-oe", "csv")
    rows = json.loads(res.stdout)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(8, 0), (0, 4)]
    for r in rows:
        for f in LLAMA_BENCH_FIELDS + LSTREAM_FIELDS:
            assert f in r, f
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 2
        assert r["n_threads"] == 1 and r["n_gpu_layers"] == 0 and r["backends"] == "CPU"
        assert r["avg_ts"] > 0
    csv_rows = list(csv.DictReader(io.StringIO(res.stderr)))
    assert len(csv_rows) == 2
    assert set(LLAMA_BENCH_FIELDS + LSTREAM_FIELDS) <= set(csv_rows[0])
    assert int(csv_rows[1]["n_gen"]) == 4 and float(csv_rows[1]["avg_ts"]) > 0


def test_sql_loads_into_sqlite_and_jsonl_has_samples_with_pg_and_depth():
    res = bench("-pg", "8,4", "-d", "0,4", "-o", "sql", "-oe", "jsonl")
    db = sqlite3.connect(":memory:")
    db.executescript(res.stdout)
    got = db.execute("SELECT n_prompt, n_gen, n_depth, n_threads FROM test ORDER BY rowid").fetchall()
    assert got == [(8, 0, 0, 1), (8, 0, 4, 1), (0, 4, 0, 1), (0, 4, 4, 1), (8, 4, 0, 1), (8, 4, 4, 1)]
    assert db.execute("SELECT count(*) FROM test WHERE avg_ts > 0").fetchone() == (6,)
    lines = [json.loads(x) for x in res.stderr.splitlines() if x.startswith("{")]
    assert len(lines) == 6 and all(len(x["samples_ts"]) == 2 for x in lines)


def test_markdown_names_tests_and_shows_varied_columns_with_progress():
    res = bench("bench", "-p", "8", "-n", "0", "-r", "2", "-t", "1", "-pg", "8,4", "-d", "4", "-ub", "4,8",
                "--progress", "-v", base=[])
    out = res.stdout.splitlines()
    assert out[0].split("|")[1:-1] == [" model ", " size ", " params ", " backend ", " threads ", " n_ubatch ",
                                       " test ", " t/s "]
    body = [line for line in out[2:] if line.startswith("|")]
    tests = [line.split("|")[-3].strip() for line in body]
    assert tests == ["pp8 @ d4", "pp8+tg4 @ d4"] * 2
    assert all("MiB" in line and " M |" in line and " ± " in line for line in body)
    assert "benchmark 1/4: starting" in res.stderr and "benchmark 4/4: prompt run 2/2" in res.stderr
    assert "samples_ns" in res.stderr  # -v


def test_ctrl_c_prints_the_rows_that_finished(monkeypatch):
    import lstream.core.benchmark as cb
    real, calls = cb.run_test, []

    def interrupted_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(cb, "run_test", interrupted_second)
    res = CliRunner().invoke(cli, [*TINY, "-o", "json"])
    assert res.exit_code == 130
    rows = json.loads(res.stdout)
    assert len(rows) == 1 and rows[0]["n_prompt"] == 8
    assert "interrupted" in res.stderr


def test_bad_values_are_one_line_errors():
    res = CliRunner().invoke(cli, ["bench", "-ub", "8-4*1"])
    assert res.exit_code != 0 and "never ends" in res.output
    res = CliRunner().invoke(cli, ["bench", "--policy", "sometimes"])
    assert res.exit_code != 0 and "sometimes" in res.output


def test_moe_share_list_is_one_load_and_a_column(monkeypatch):
    """--moe-share takes a comma list like llama-bench's numeric options: one row per value, from one
    loaded model (the share is set on the loaded model), and a column once it varies."""
    import lstream.loaders.model_file as model_file
    real, loads = model_file.load_model, []
    monkeypatch.setattr(model_file, "load_model", lambda path: loads.append(path) or real(path))
    res = bench("-p", "0", "-n", "4", "-r", "1", "-t", "1", "--moe-share", "0,2", "--moe-share", "auto", "-o", "json",
                base=["bench"])
    rows = json.loads(res.stdout)
    assert [r["moe_share"] for r in rows] == [0, 2, "auto"] and len(loads) == 1
    md = bench("-p", "0", "-n", "4", "-r", "1", "-t", "1", "--moe-share", "0,2", base=["bench"]).stdout.splitlines()
    assert " moe-share " in md[0].split("|")


def test_moe_share_default_is_auto_and_bad_values_are_one_line_errors():
    from lstream.backends.cuda.hop_share import share_count
    from lstream.core.options import MOE_SHARE_AUTO, Options
    assert Options().moe_share == MOE_SHARE_AUTO and Options.from_env({"LSTREAM_MOE_SHARE": "0"}).moe_share == 0
    assert [share_count(MOE_SHARE_AUTO, k) for k in (1, 2, 8)] == [0, 1, 4]  # Qwen3-MoE: 4 of 8
    assert share_count(3, 8) == 3 and share_count(12, 8) == 8
    for args in (["bench", "--moe-share", "half"], ["run", "--moe-share", "-2", "-p", "hi"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0 and "moe-share" in res.output and "Traceback" not in res.output, res.output
