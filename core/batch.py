"""Batch sizes that change how a matmul runs: the one place these numbers are defined.

SMALL_BATCH: up to this many tokens a step is decode-sized. Each matmul reads every weight once
  as matrix-vector products on the quantized blocks (CPU decode kernels and the compiled CPU
  programs, the GPU's GEMV), and a fully resident GPU step is replayed from a CUDA graph.
GEMM_MIN_TOKENS: from this many tokens the CPU multiplies through dequantized tiles and sgemm
  (prefill); between SMALL_BATCH and it, its int16 kernels quantize the activations.
UPLOAD_THRESHOLD: the default upload policy's batch size (llama.cpp's GGML_OP_OFFLOAD_MIN_BATCH):
  from this many tokens a non-resident weight is uploaded to the GPU, below it computed on the CPU.
EXPERT_UPLOAD_THRESHOLD: the same question for one expert of a MoE layer whose experts live in host
  memory, asked with the tokens of the ubatch routed to that expert (not the ubatch's size): an
  expert reads its weights once for all its tokens on either side, so uploading it pays when its
  tokens' CPU compute outlasts the copy. Estimated for Qwen3-30B-A3B on a 16-core host and PCIe 5
  (Q4_K expert 2.8 MB: ~60 us to copy; CPU ~30 us per token once the weights are read): 4 tokens.
"""
from __future__ import annotations

SMALL_BATCH = 8
GEMM_MIN_TOKENS = 32
UPLOAD_THRESHOLD = 32
EXPERT_UPLOAD_THRESHOLD = 4


def is_small_batch(n_tokens: int) -> bool:
    return n_tokens <= SMALL_BATCH
