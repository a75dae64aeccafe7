"""llama-perplexity's method on tests/data/declaration.txt (the US Declaration of Independence,
public domain): chunking and scoring rule, the printout, and the number against exp(mean NLL)
computed independently from transformers' logits of the same GGUF on the same chunks."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

TEXT = Path(__file__).parent / "data" / "declaration.txt"
N_CTX = 128
N_CHUNKS = 6  # --chunks: all of declaration.txt's whole chunks at -c 128 (815 tokens)


@pytest.fixture(scope="module")
def model_path():
    from lstream.loaders.registry import pull
    return pull("smollm2-135m", quiet=True)


@pytest.fixture(scope="module")
def model(model_path):
    import lstream
    m = lstream.load(str(model_path), n_ctx=N_CTX, n_threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def cli_run(model):
    """`lstream perplexity -f declaration.txt -c 128` on the already loaded model."""
    import lstream.cli.perplexity as ppl_cli
    import lstream.core.perplexity as core_ppl
    from lstream.cli.main import cli
    real, results = core_ppl.perplexity, []
    mp = pytest.MonkeyPatch()
    mp.setattr(ppl_cli, "load_model", lambda **kw: model)
    mp.setattr(core_ppl, "perplexity", lambda *a, **kw: results.append(real(*a, **kw)) or results[-1])
    try:
        res = CliRunner().invoke(cli, ["perplexity", "-f", str(TEXT), "-c", str(N_CTX), "--chunks", str(N_CHUNKS),
                                       "--profile"],
                                 catch_exceptions=False)
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    res.result = results[0]
    return res


def chunks(tokens, n_ctx, bos):
    """llama-perplexity: n_chunk = len // n_ctx whole chunks, first token replaced by BOS if the
    model adds one; logits at positions n_ctx/2 .. n_ctx-2 score tokens n_ctx/2+1 .. n_ctx-1."""
    out = []
    for i in range(len(tokens) // n_ctx):
        c = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


def test_printout_is_llama_perplexity_s(cli_run, model):
    tokens = model.tokenize(TEXT.read_text())
    assert len(tokens) // N_CTX >= N_CHUNKS
    n_chunk = N_CHUNKS
    running = re.findall(r"\[(\d+)\](\d+\.\d{4}),", cli_run.stdout)
    assert [int(i) for i, _ in running] == list(range(1, n_chunk + 1))
    m = re.search(r"Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})", cli_run.stdout)
    assert m and float(m[1]) == pytest.approx(float(running[-1][1]), abs=1e-4)
    assert float(m[2]) > 0
    assert f"over {n_chunk} chunks, n_ctx={N_CTX}" in cli_run.stderr
    assert "profile: perplexity" in cli_run.stderr and "CPU compute" in cli_run.stderr  # --profile


def test_method_scores_second_half_of_each_chunk(cli_run):
    res = cli_run.result
    n_chunk = N_CHUNKS
    assert res.n_tokens_scored == n_chunk * (N_CTX - 1 - N_CTX // 2)
    assert len(res.chunk_ppl) == n_chunk
    assert res.ppl == pytest.approx(math.exp(res.nll.mean()), rel=1e-9)
    # llama-perplexity's error: ppl * sqrt(var(nll) / (count - 1))
    var = (res.nll ** 2).mean() - res.nll.mean() ** 2
    assert res.err == pytest.approx(res.ppl * math.sqrt(var / (len(res.nll) - 1)), rel=1e-9)


def test_ppl_matches_transformers_within_1_percent(cli_run, model, model_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    hf.eval()
    cfg = model.config
    tokens = model.tokenize(TEXT.read_text())[:N_CHUNKS * N_CTX]
    first = N_CTX // 2
    nll = []
    with torch.no_grad():
        for c in chunks(tokens, N_CTX, cfg.bos_id if cfg.add_bos else None):
            logits = hf(torch.tensor([c])).logits[0].double()
            lp = torch.log_softmax(logits[first:N_CTX - 1], dim=-1)
            nll.append(-lp[torch.arange(len(lp)), torch.tensor(c[first + 1:])].numpy())
    ref = float(np.exp(np.concatenate(nll).mean()))
    ours = cli_run.result.ppl
    mad = float(np.abs(cli_run.result.nll - np.concatenate(nll)).mean())  # same tokens scored, one by one
    print(f"\ndeclaration.txt -c {N_CTX}: lstream PPL {ours:.4f}, transformers {ref:.4f}, mean |dNLL| {mad:.4f}")
    assert mad < 0.1
    assert abs(ours / ref - 1) < 0.01


def test_too_short_text_is_a_clear_error(model, tmp_path, monkeypatch):
    import lstream.cli.perplexity as ppl_cli
    from lstream.cli.main import cli
    monkeypatch.setattr(ppl_cli, "load_model", lambda **kw: model)
    f = tmp_path / "short.txt"
    f.write_text("Too short.")
    res = CliRunner().invoke(cli, ["perplexity", "-f", str(f), "-c", str(N_CTX)])
    assert res.exit_code == 1 and "you need at least 256 tokens" in res.stderr
