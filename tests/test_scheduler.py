"""The scheduler with fake backends: placements and the causes it records."""
from __future__ import annotations

import pytest

from lstream.backends.base import Backend
from lstream.core.arch import build_graph
from lstream.core.config import ModelConfig
from lstream.core.ops import Op
from lstream.core.policy import Always, BatchThreshold, Never
from lstream.core.qtypes import QType, tensor_bytes
from lstream.core.residency import HOST, ResidencyMap, TensorEntry
from lstream.core.scheduler import schedule

CFG = ModelConfig(arch="llama", n_layer=4, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16, vocab_size=100)


def tiny_residency(cfg=CFG) -> ResidencyMap:
    rm = ResidencyMap(cfg.n_layer)

    def add(name, layer, shape, qt=QType.Q4_0):
        if len(shape) == 1:
            qt = QType.F32
        rm.add(TensorEntry(name, layer, shape, qt, tensor_bytes(qt, shape), None))
    add("token_embd.weight", -1, (cfg.vocab_size, cfg.n_embd))
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        for n in ("attn_norm", "ffn_norm"):
            add(p + n + ".weight", il, (cfg.n_embd,))
        add(p + "attn_q.weight", il, (cfg.n_head * cfg.head_dim, cfg.n_embd))
        add(p + "attn_k.weight", il, (cfg.n_head_kv * cfg.head_dim, cfg.n_embd))
        add(p + "attn_v.weight", il, (cfg.n_head_kv * cfg.head_dim, cfg.n_embd))
        add(p + "attn_output.weight", il, (cfg.n_embd, cfg.n_head * cfg.head_dim))
        add(p + "ffn_gate.weight", il, (cfg.n_ff, cfg.n_embd))
        add(p + "ffn_up.weight", il, (cfg.n_ff, cfg.n_embd))
        add(p + "ffn_down.weight", il, (cfg.n_embd, cfg.n_ff))
    add("output_norm.weight", cfg.n_layer, (cfg.n_embd,))
    add("output.weight", cfg.n_layer, (cfg.vocab_size, cfg.n_embd))
    return rm


class FakeCPU(Backend):
    name = HOST

    def supports_op(self, node):
        return True


class PartialDevice(Backend):
    """Supports only matmuls and norms; never offloads."""
    name = "dev"

    def supports_op(self, node):
        return node.op in (Op.MATMUL, Op.RMS_NORM)


class ThresholdDevice(Backend):
    """Supports everything; offloads a host weight's op when the policy says so."""
    name = "dev"

    def __init__(self, policy):
        self.policy = policy

    def supports_op(self, node):
        return True

    def offload_op(self, node, n_tokens, residency):
        if node.op is Op.EMBED:
            return False, "embedding stays with its table"
        entry = residency[node.weight] if node.weight else None
        ok = self.policy.should_upload(node.op, entry, n_tokens)
        return ok, f"{self.policy.describe()} at {n_tokens} tokens"


@pytest.fixture
def graph_and_map():
    rm = tiny_residency()
    return build_graph(CFG, {e.name for e in rm}), rm


def test_cpu_only_everything_on_cpu_with_data_cause(graph_and_map):
    g, rm = graph_and_map
    plan = schedule(g, rm, [FakeCPU()], n_tokens=512)
    assert len(plan.splits) == 1 and plan.splits[0].backend == HOST
    causes = {a.node.name: a.cause for a in plan.assignments()}
    assert causes["blk.0.q"] == "data on cpu"
    assert causes["blk.0.attn"] == "data on cpu"
    assert causes["blk.0.swiglu"].startswith("follows")
    assert plan.upload_bytes == 0


def test_resident_layers_run_where_they_live_and_activations_copy_at_boundaries(graph_and_map):
    g, rm = graph_and_map
    rm.assign(2, "dev")  # llama.cpp -ngl 2: the last two blocks, not the output layer
    assert rm["blk.1.attn_q.weight"].home == HOST and rm["blk.2.attn_q.weight"].home == "dev"
    assert rm["output.weight"].home == HOST and rm["token_embd.weight"].home == HOST
    plan = schedule(g, rm, [ThresholdDevice(Never()), FakeCPU()], n_tokens=512)
    by_layer = {a.node.layer: a.backend for a in plan.assignments() if a.node.op is Op.MATMUL}
    assert by_layer == {0: HOST, 1: HOST, 2: "dev", 3: "dev", 4: HOST}
    assert [s.backend for s in plan.splits] == [HOST, "dev", HOST]
    # the residual stream enters the device split once and comes back once
    assert len(plan.splits[1].copy_inputs) == 1 and len(plan.splits[2].copy_inputs) == 1
    assert plan.upload_bytes == 0


def test_output_layer_counts_as_one_more_layer(graph_and_map):
    _, rm = graph_and_map
    rm.assign(CFG.n_layer + 1, "dev")
    assert rm["output.weight"].home == "dev" and rm["token_embd.weight"].home == HOST


def test_threshold_policy_uploads_for_big_batches_only(graph_and_map):
    g, rm = graph_and_map
    rm.assign(0, "dev")
    dev = ThresholdDevice(BatchThreshold(32))
    big = schedule(g, rm, [dev, FakeCPU()], n_tokens=32)
    small = schedule(g, rm, [dev, FakeCPU()], n_tokens=31)
    q_big = next(a for a in big.assignments() if a.node.name == "blk.0.q")
    q_small = next(a for a in small.assignments() if a.node.name == "blk.0.q")
    assert q_big.backend == "dev" and q_big.cause.startswith("offload: threshold(32)")
    assert q_big.uploads == ("blk.0.attn_q.weight",)
    assert q_small.backend == HOST and q_small.cause == "data on cpu" and not q_small.uploads
    embed = next(a for a in big.assignments() if a.node.op is Op.EMBED)
    assert embed.backend == HOST
    expected = sum(e.nbytes for e in rm if e.layer >= 0)
    assert big.upload_bytes == expected and small.upload_bytes == 0
    assert [s.backend for s in big.splits] == [HOST, "dev"]


def test_partial_backend_leaves_unsupported_ops_to_cpu(graph_and_map):
    g, rm = graph_and_map
    rm.assign(99, "dev")
    plan = schedule(g, rm, [PartialDevice(), FakeCPU()], n_tokens=1)
    got = {a.node.name: (a.backend, a.cause) for a in plan.assignments()}
    assert got["blk.0.q"] == ("dev", "data on dev")
    assert got["blk.0.q_rope"][0] == HOST  # rope unsupported on dev: first backend that can
    # attention's K/V live on dev, which cannot run it: CPU runs it and records why
    assert got["blk.0.attn"] == (HOST, "dev lacks attention")
    assert len(plan.splits) > 3


def test_always_policy_and_custom_policy(graph_and_map):
    g, rm = graph_and_map
    rm.assign(0, "dev")

    class OnlyFFN:
        def should_upload(self, op, entry, n_tokens):
            return entry is not None and "ffn" in entry.name

        def describe(self):
            return "only-ffn"

    plan = schedule(g, rm, [ThresholdDevice(Always()), FakeCPU()], n_tokens=1)
    assert all(a.backend == "dev" for a in plan.assignments() if a.node.op is Op.MATMUL)
    plan = schedule(g, rm, [ThresholdDevice(OnlyFFN()), FakeCPU()], n_tokens=1)
    where = {a.node.name: a.backend for a in plan.assignments()}
    assert where["blk.0.gate"] == "dev" and where["blk.0.q"] == HOST


def test_vram_budget_drops_output_then_first_layers(graph_and_map):
    _, rm = graph_and_map
    per_layer = sum(e.nbytes for e in rm.layer(0))
    notes = rm.assign(99, "dev", budget_bytes=2 * per_layer)
    assert rm["output.weight"].home == HOST
    assert [rm[f"blk.{i}.attn_q.weight"].home for i in range(4)] == [HOST, HOST, "dev", "dev"]
    assert notes and "budget" in notes[0]


def test_override_tensor_pattern(graph_and_map):
    _, rm = graph_and_map
    rm.assign(99, "dev", overrides=[(r"ffn_(up|down|gate)", "cpu")])
    assert rm["blk.3.ffn_up.weight"].home == HOST and rm["blk.3.attn_q.weight"].home == "dev"
    assert rm.layer_home(3) == HOST  # mixed layer: K/V stay on the host


def test_plan_is_pure_and_deterministic(graph_and_map):
    g, rm = graph_and_map
    rm.assign(2, "dev")
    bs = [ThresholdDevice(BatchThreshold(32)), FakeCPU()]
    homes = [(e.name, e.home, e.state) for e in rm]
    assert schedule(g, rm, bs, 64).signature() == schedule(g, rm, bs, 64).signature()
    assert [(e.name, e.home, e.state) for e in rm] == homes  # planning changes no residency
