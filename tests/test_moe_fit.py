"""Mixtures of experts in fit-before-load, the upload policy's per-expert question, the flags
(--n-cpu-moe, --cpu-moe, --expert-threshold, -ot exps=cpu) and what `lstream plan` / `info` print."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
from click.testing import CliRunner

from lstream.core.fit import GiB, MiB, fit, needs
from lstream.core.expert_streaming import EXPERT_LAYER_SLOTS
from lstream.core.ops import Op
from lstream.core.policy import Always, BatchThreshold, Never, make_policy
from lstream.core.qtypes import QType
from lstream.core.residency import TensorEntry

KV = 16 * MiB
ATTN, EXPERTS = 64 * MiB, 1 * GiB  # per layer: attention + router, and its experts (3 tensors)


def moe_model(n_layer=8):
    es = [NS(name="token_embd.weight", layer=-1, shape=(32000, 2048), nbytes=100 * MiB, alias_of=None),
          NS(name="output.weight", layer=n_layer, shape=(32000, 2048), nbytes=100 * MiB, alias_of=None)]
    for il in range(n_layer):
        es += [NS(name=f"blk.{il}.attn_{k}.weight", layer=il, shape=(2048, 2048), nbytes=ATTN // 4, alias_of=None)
               for k in ("q", "k", "v", "output")]
        es += [NS(name=f"blk.{il}.ffn_{k}_exps.weight", layer=il, shape=(128, 768, 2048), nbytes=EXPERTS // 4,
                  alias_of=None) for k in ("gate", "up")]
        es += [NS(name=f"blk.{il}.ffn_down_exps.weight", layer=il, shape=(128, 2048, 768), nbytes=EXPERTS // 2,
                  alias_of=None)]
    return es


def test_cpu_moe_moves_experts_off_the_device():
    es = moe_model()
    full = needs(es, 8, 9, KV)
    assert full.weights == 8 * (ATTN + EXPERTS) + 100 * MiB and full.experts == 0
    cpu = needs(es, 8, 9, KV, n_cpu_moe=8)
    assert cpu.weights == 8 * ATTN + 100 * MiB
    assert cpu.experts == EXPERT_LAYER_SLOTS * EXPERTS  # slots for the experts uploaded per ubatch
    assert cpu.pinned == 8 * EXPERTS and cpu.slots == 0  # nothing else streamed
    ot = needs(es, 8, 9, KV, host_patterns=["exps"])  # -ot exps=cpu: the same placement
    assert (ot.weights, ot.experts, ot.pinned) == (cpu.weights, cpu.experts, cpu.pinned)
    assert needs(es, 8, 9, KV, n_cpu_moe=3).weights == 8 * ATTN + 5 * EXPERTS + 100 * MiB


def test_fit_raises_n_cpu_moe_before_lowering_ngl():
    es = moe_model()
    free = needs(es, 8, 9, KV, n_cpu_moe=5).device + 256 * MiB  # the reserve
    r = fit(es, 8, 9, free_device=free, kv_bytes_per_layer=KV)
    assert (r.ngl, r.n_cpu_moe) == (9, 5)
    assert r.note.endswith("experts of the first 5 layers in host memory (--n-cpu-moe 5)")
    r = fit(es, 8, 9, free_device=free, kv_bytes_per_layer=KV, n_cpu_moe=6)  # asked for more: kept
    assert (r.ngl, r.n_cpu_moe, r.note) == (9, 6, None)
    tight = needs(es, 8, 4, KV, n_cpu_moe=8).device + 256 * MiB  # all experts out, still too big: -ngl falls
    r = fit(es, 8, 9, free_device=tight, kv_bytes_per_layer=KV)
    assert (r.ngl, r.n_cpu_moe) == (4, 8) and r.note.endswith("using -ngl 4")


def test_policy_per_expert():
    e = TensorEntry("blk.0.ffn_up_exps.weight", 0, (8, 64, 32), QType.Q8_0, 8 * 64 * 34, None)
    assert e.n_expert == 8 and e.n_rows == 8 * 64 and e.expert_nbytes == 64 * 34
    thr = BatchThreshold()
    assert thr.should_upload_expert(Op.MOE, e, 4, 8) and not thr.should_upload_expert(Op.MOE, e, 3, 512)
    assert not Never().should_upload_expert(Op.MOE, e, 512, 512)
    assert Always().should_upload_expert(Op.MOE, e, 1, 1) and not Always().should_upload_expert(Op.MOE, e, 0, 1)
    assert make_policy("threshold", expert_threshold=9).expert_threshold == 9
    assert make_policy("auto").expert_threshold == 4
    with pytest.raises(ValueError, match="expert threshold"):
        make_policy("auto", expert_threshold=0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("transformers")
    from lstream.tools import tiny_moe
    d, _, _ = tiny_moe.write("mixtral", tmp_path_factory.mktemp("mx"), gguf_types=("Q8_0",))
    return d / "mixtral-Q8_0.gguf"


def test_cli_plan_and_info_show_experts(tiny_gguf):
    from lstream.cli.main import cli as main
    r = CliRunner().invoke(main, ["plan", "-m", str(tiny_gguf), "-cmoe", "-ub", "16", "--expert-threshold", "3",
                                  "-c", "64"])
    assert r.exit_code == 0, r.output
    assert "experts: 8 per MoE layer, 2 per token; a host expert is uploaded when 3+ tokens" in r.output
    assert r.output.count("data on cpu") >= 2  # no device here: the experts run where they live
    r = CliRunner().invoke(main, ["info", "-m", str(tiny_gguf), "-ngl", "99", "--n-cpu-moe", "1"])
    assert r.exit_code == 0, r.output
    assert "experts: 8 per MoE layer, 2 per token, ffn 64, top-k weights renormalized" in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip().startswith("experts 8 x")]
    from lstream.backends.devices import cuda_available
    # info shows where run would place them on this machine: without a GPU, everything on the CPU
    assert len(lines) == 2 and lines[0].endswith("on cpu") and lines[1].endswith("on cuda" if cuda_available() else "on cpu")
    assert "(ffn_gate_exps, ffn_up_exps, ffn_down_exps)" in lines[0]
