"""Batch sizes that change how a matmul runs: the one place these numbers are defined.

SMALL_BATCH: up to this many tokens a step is decode-sized. Each matmul reads every weight once
  as matrix-vector products on the quantized blocks (CPU decode kernels and the compiled CPU
  programs, the GPU's GEMV), and a fully resident GPU step is replayed from a CUDA graph.
GEMM_MIN_TOKENS: from this many tokens the CPU multiplies through dequantized tiles and sgemm
  (prefill); between SMALL_BATCH and it, its int16 kernels quantize the activations.
UPLOAD_THRESHOLD: the default upload policy's batch size (llama.cpp's GGML_OP_OFFLOAD_MIN_BATCH):
  from this many tokens a non-resident weight is uploaded to the GPU, below it computed on the CPU.
"""
from __future__ import annotations

SMALL_BATCH = 8
GEMM_MIN_TOKENS = 32
UPLOAD_THRESHOLD = 32


def is_small_batch(n_tokens: int) -> bool:
    return n_tokens <= SMALL_BATCH
