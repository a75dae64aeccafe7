"""--profile's table and --trace's Chrome trace, from what the executor records: on the CPU alone,
and with the fake device backend (backends/cuda.py's code on CPU tensors) so the device tracks and
the hops between backends show up without a GPU. Nothing here asserts a duration's size."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lstream.core import profile as P


@pytest.fixture(scope="module")
def path():
    from lstream.loaders.registry import pull
    return pull("smollm2-135m", quiet=True)


@pytest.fixture(scope="module")
def cpu_model(path):
    from lstream.api import Model
    from lstream.loaders.model_file import load_model
    m = Model(load_model(path), n_ctx=64, n_threads=1, load_tokenizer=False)
    yield m
    m.close()


def test_cpu_table_per_layer_and_total(cpu_model, tmp_path):
    n_layer = cpu_model.config.n_layer
    trace = tmp_path / "t.json"
    lines = []
    with P.profiling(cpu_model, True, trace, echo=lines.append, title="test") as prof:
        cpu_model.reset()
        cpu_model.eval(list(range(10, 18)))
        cpu_model.eval([5])
    assert cpu_model.profile is None
    rows = P.per_layer(prof)
    assert sorted(rows) == list(range(-1, n_layer + 1))  # embd, every block, output
    for row in rows.values():
        assert row["CPU compute"] > 0
        assert row["GPU compute"] == row["copy to GPU"] == row["wait for copy"] == row["hop"] == 0
    tot = P.totals(prof)
    assert 0 < sum(r["CPU compute"] for r in rows.values()) <= tot["CPU compute"]  # ops inside their splits
    text = lines[0]
    header = text.splitlines()[1].split()
    assert header[0] == "layer" and "total" in text and "output" in text and "embd" in text
    doc = json.loads(trace.read_text())
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"CPU", "GPU compute stream", "copy stream"}
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert xs and all(e["tid"] == P.TRACKS["CPU"] and e["dur"] >= 0 for e in xs)
    assert len(xs) == 2 * (n_layer + 2)  # one span per layer per eval: consecutive ops merged
    assert [e["ts"] for e in xs] == sorted(e["ts"] for e in xs)


def test_device_and_hops_land_on_their_own_tracks(path, tmp_path):
    from fake_device import FakeDeviceBackend
    from lstream.api import Model
    from lstream.core.policy import Never
    from lstream.loaders.model_file import load_model
    dev = FakeDeviceBackend(policy=Never())
    m = Model(load_model(path), n_gpu_layers=1, device_backend=dev, n_ctx=64, n_threads=1, load_tokenizer=False)
    m.set_policy(Never())  # one layer resident on the device, the rest where it lives (CPU)
    try:
        prof = P.start(m, trace=True)
        m.eval(list(range(10, 14)))
        m.profile = None
    finally:
        m.close()
    tot = P.totals(prof)
    assert tot["GPU compute"] > 0 and tot["CPU compute"] > 0 and tot["hop"] > 0
    assert prof.bytes_hopped > 0
    rows = P.per_layer(prof)
    on_device = [k for k, r in rows.items() if r["GPU compute"] > r["CPU compute"]]
    assert len(on_device) == 1 and 0 <= on_device[0] < m.config.n_layer  # -ngl 1: one block resident
    assert sum(r["GPU compute"] == 0 for r in rows.values()) >= m.config.n_layer - 1
    P.write_trace(prof, m.config.n_layer, tmp_path / "t.json")
    xs = [e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "X"]
    tids = {e["tid"] for e in xs}
    assert tids == {P.TRACKS["CPU"], P.TRACKS["GPU compute stream"], P.TRACKS["copy stream"]}


def test_phase_names_from_the_backends_map_to_columns_and_tracks():
    from lstream.core.executor import Profile
    prof = Profile(spans=[])
    prof.add("cuda copy (device)", 0.004)
    prof.add("cuda copy stall (device)", 0.001)
    prof.add("cuda compute", 0.002)
    prof.add_layer(3, "upload", 1.0, 1.004, "copy")
    prof.add_layer(3, "cuda compute", 1.004, 1.006, "cuda")
    tot = P.totals(prof)
    assert tot["copy to GPU"] == pytest.approx(0.004) and tot["wait for copy"] == pytest.approx(0.001)
    assert tot["GPU compute"] == pytest.approx(0.002)
    ev = [e for e in P.trace_events(prof, 30) if e["ph"] == "X"]
    assert [e["tid"] for e in ev] == [P.TRACKS["copy stream"], P.TRACKS["GPU compute stream"]]
    assert ev[0]["ts"] == 0 and ev[1]["ts"] == pytest.approx(4000)
    assert "copy to GPU" in P.table(prof, 30)


def test_bench_and_perplexity_accept_profile_and_trace(tmp_path):
    from lstream.cli.main import cli
    trace = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", "-p", "4", "-n", "0", "-r", "1", "-t", "1", "--profile",
                                   "--trace", str(trace)])
    assert res.exit_code == 0, res.output
    assert "profile: pp4" in res.stderr and "CPU compute" in res.stderr
    assert json.loads(trace.read_text())["traceEvents"]
