"""lstream's Python API in one runnable script (CPU is enough; pass a GPU count with -ngl):

    python tools/example_api.py            # the default model, smollm2-135m (pulled on first use)
    python tools/example_api.py -m path/to/model.gguf -ngl 8
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lstream
from lstream import BatchThreshold, Sampler, SamplerConfig, UploadPolicy
from lstream.core.ops import Op


class UploadBigMatmuls(UploadPolicy):
    """A policy of your own: upload a non-resident weight only for matmuls over at least
    `min_tokens` tokens, and only when the weight is big enough for the copy to pay off.
    The device backend asks `should_upload(op, entry, n_tokens)` for each op whose weight is not
    on the device; `entry` is the weight's residency entry (name, qtype, shape, nbytes, layer)."""
    name = "big-matmuls"

    def __init__(self, min_tokens: int = 64, min_bytes: int = 1 << 20):
        self.min_tokens, self.min_bytes = min_tokens, min_bytes

    def should_upload(self, op, entry, n_tokens):
        if op is not Op.MATMUL or entry is None:
            return n_tokens >= self.min_tokens
        return n_tokens >= self.min_tokens and entry.nbytes >= self.min_bytes

    def describe(self):
        return f"{self.name}({self.min_tokens}, {self.min_bytes >> 20} MiB)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-ngl", type=int, default=0)
    a = ap.parse_args()

    # 1. Load: the residency (-ngl layers on the GPU) and the upload policy for the rest.
    model = lstream.load(a.model, n_gpu_layers=a.ngl, policy=BatchThreshold(64), n_ctx=2048)

    # 2. Generate (greedy), then stream with sampling.
    print(model.generate("The capital of France is", n_predict=12, temp=0))
    sampler = Sampler(SamplerConfig(temp=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=42))
    model.reset()
    for piece in model.stream("Once upon a time", n_predict=24, sampler=sampler):
        print(piece, end="", flush=True)
    print()

    # 3. Chat with the model's template.
    print(model.chat([{"role": "system", "content": "You are brief."},
                      {"role": "user", "content": "Name three colours."}], n_predict=24))

    # 4. Score: perplexity, llama-perplexity's method (chunks of n_ctx, second half scored).
    text = (Path(__file__).resolve().parent.parent / "tests" / "data" / "declaration.txt").read_text()
    res = model.perplexity(text, n_ctx=128)
    print(f"PPL = {res.ppl:.4f} +/- {res.err:.5f} over {res.n_tokens_scored} tokens")

    # 5. Bench: llama-bench's timing (warm-up, repetitions, mean ± stddev t/s).
    for r in lstream.bench(model, n_prompt=32, n_gen=8, reps=2):
        print(f"{r.name}: {r.avg_ts:.1f} ± {r.stddev_ts:.1f} t/s")

    # 6. Your own policy: where each op would run at a prefill of 512 tokens and at decode.
    model.set_policy(UploadBigMatmuls(64))
    for n in (512, 1):
        plan = model.plan(n)
        print(f"{n:>4} tokens: {len(plan.splits)} splits, {plan.upload_bytes / 2**20:.1f} MiB uploaded per pass")
    model.close()


if __name__ == "__main__":
    main()
