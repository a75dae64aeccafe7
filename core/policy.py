"""Upload policies: for a weight that is not resident on a device, upload it or compute on the CPU?

A policy is an UploadPolicy: `should_upload(op, entry, n_tokens) -> bool` (and a `name`), plus two
optional hooks declared with their defaults below. The device backend asks it from its `offload_op`;
the scheduler records the answer as a cause.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .batch import EXPERT_UPLOAD_THRESHOLD, UPLOAD_THRESHOLD, is_small_batch
from .ops import Op
from .residency import TensorEntry


class UploadPolicy:
    name = "policy"
    # MoE: tokens routed to one expert from which it is uploaded (should_upload_expert)
    expert_threshold = EXPERT_UPLOAD_THRESHOLD

    def should_upload(self, op: Op, entry: TensorEntry | None, n_tokens: int) -> bool:
        raise NotImplementedError

    # MoE decode: of a small step's routed experts in host memory, how many (the most routed) the
    # device uploads and computes while the CPU computes the others: PCIe and the host's memory are
    # separate paths, so both share a step's expert bytes. AutoSplit measures it (api.py).
    decode_experts = 0

    def should_upload_expert(self, op: Op, entry: TensorEntry, n_routed: int, n_tokens: int) -> bool:
        """A MoE op whose experts live in host memory, on a device: upload this expert (and compute
        it there) when n_routed of the ubatch's n_tokens are routed to it, else compute it on the CPU.
        entry: one of the layer's 3-D expert tensors. The device asks per expert once the ubatch is
        routed; the scheduler asks with n_routed = n_tokens (could any expert be uploaded?)."""
        return n_routed >= self.expert_threshold

    def may_upload_experts(self, op: Op, entry: TensorEntry, n_tokens: int) -> bool:
        """The scheduler's question: could a ubatch of n_tokens upload any of these experts?"""
        return self.should_upload_expert(op, entry, n_tokens, n_tokens) or (
            self.decode_experts > 0 and is_small_batch(n_tokens))

    def experts_to_upload(self, op: Op, entry: TensorEntry, counts, n_tokens: int) -> list[int]:
        """counts: tokens routed to each expert of the ubatch -> the experts to upload: those with
        enough tokens, else (a small step) its `decode_experts` most routed."""
        routed = [int(e) for e in np.nonzero(counts)[0]]
        up = [e for e in routed if self.should_upload_expert(op, entry, int(counts[e]), n_tokens)]
        if not up and self.decode_experts > 0 and is_small_batch(n_tokens):
            up = sorted(sorted(routed, key=lambda e: -counts[e])[:self.decode_experts])
        return up

    def prepare(self, residency, device: str) -> None:
        """Called when the policy is given to a device backend (and after the residency changes):
        a policy that decides per layer reads the residency here, once."""

    # A policy that sets itself by measurement (AutoSplit): the model times decode steps with
    # each setting it proposes (core/tuning.py) and keeps the fastest.
    needs_tuning = False

    def describe(self) -> str:
        return self.name


class BatchThreshold(UploadPolicy):
    """llama.cpp's rule: upload when the batch has at least `threshold` tokens (default 32)."""
    name = "threshold"

    def __init__(self, threshold: int = UPLOAD_THRESHOLD):
        if threshold < 1:
            raise ValueError(f"threshold must be a positive token count, found {threshold}")
        self.threshold = threshold

    def should_upload(self, op, entry, n_tokens):
        return n_tokens >= self.threshold

    def describe(self):
        return f"threshold({self.threshold})"


class Never(UploadPolicy):
    """Non-resident weights are always computed where they live (llama-bench -nopo 1)."""
    name = "never"

    def should_upload(self, op, entry, n_tokens):
        return False

    def should_upload_expert(self, op, entry, n_routed, n_tokens):
        return False


class Always(UploadPolicy):
    name = "always"

    def should_upload(self, op, entry, n_tokens):
        return True

    def should_upload_expert(self, op, entry, n_routed, n_tokens):
        return n_routed > 0


@dataclass
class Calibration:
    """Measured once per machine: bytes/s host->device and weights/s per side and type."""
    h2d_bytes_per_s: float
    gpu_flops: float  # dense matmul FLOP/s incl. dequantization, per token-weight pair x2
    cpu_weights_per_s: dict[str, float] = field(default_factory=dict)  # qtype name -> G weights/s at batch 1
    cpu_flops: float = 0.0  # CPU matmul FLOP/s at large batch

    def cpu_seconds(self, entry: TensorEntry, n_tokens: int) -> float:
        n_w = entry.n_rows * entry.n_cols
        per_tok = self.cpu_weights_per_s.get(entry.qtype.name) or min(self.cpu_weights_per_s.values() or [1e9])
        matvec = n_w / per_tok  # reading the weights once bounds small batches
        gemm = 2.0 * n_w * n_tokens / self.cpu_flops if self.cpu_flops else 0.0
        return max(matvec, gemm)

    def gpu_seconds(self, entry: TensorEntry, n_tokens: int) -> float:
        return entry.nbytes / self.h2d_bytes_per_s + 2.0 * entry.n_rows * entry.n_cols * n_tokens / self.gpu_flops


class LayerSplit(UploadPolicy):
    """Small batches (decode): the CPU computes the first `cpu_layers` non-resident layers while
    the copy engine streams the rest to the GPU, both from the start of the step (the CPU cores and
    the PCIe link are independent resources). Their attention stays on the CPU, where their K/V
    live. Batches of `threshold` tokens or more upload everything, like BatchThreshold.
    share: the fraction of each CPU layer's FFN columns the device computes meanwhile, from bytes the
    copy engine streams every step (backends/cuda/ffn_share.py; 0: none)."""
    name = "split"

    def __init__(self, cpu_layers: int, threshold: int = UPLOAD_THRESHOLD, share: float = 0.0):
        if cpu_layers < 0:
            raise ValueError(f"cpu_layers must be >= 0, found {cpu_layers}")
        if not 0.0 <= share < 1.0:
            raise ValueError(f"share must be a fraction in [0, 1), found {share}")
        self.cpu_layers, self.threshold, self.share = cpu_layers, threshold, share
        self.first_host_layer = 0  # set by prepare(): cpu_layers counts from the first host layer
        self.n_host = 0  # layers with weights in host memory (the output layer included)

    def prepare(self, residency, device: str) -> None:
        host = sorted({e.layer for e in residency if e.layer >= 0 and e.home != device and len(e.shape) == 2})
        self.first_host_layer = host[0] if host else 0
        self.n_host = len(host)

    def should_upload(self, op, entry, n_tokens):
        if n_tokens >= self.threshold:
            return True
        if entry is None or op is Op.EMBED:
            return False  # attention reads host K/V: it stays on the CPU
        return entry.layer >= self.first_host_layer + self.cpu_layers

    def describe(self):
        sh = f", device share {self.share:.2f} of their FFN" if self.share else ""
        return f"split(cpu {self.cpu_layers} layers{sh}, threshold {self.threshold})"


class AutoSplit(LayerSplit):
    """The default. Prefill as BatchThreshold (from `threshold` tokens the weights stream to the
    GPU); decode as LayerSplit, with the CPU's share of the host layers measured on this machine
    when the policy is given to a model: a few decode steps per candidate split, the fastest kept
    (core/tuning.py). Until measured (or with no GPU to measure), half of the host layers."""
    name = "auto"
    needs_tuning = True

    def __init__(self, threshold: int = UPLOAD_THRESHOLD):
        super().__init__(0, threshold)
        self.measured: dict[int, float] | None = None  # CPU layers -> seconds per decode step
        self.share_measured: dict[float, float] | None = None  # FFN share -> seconds per decode step
        self.experts_measured: dict[int, float] | None = None  # decode_experts -> seconds per step

    def prepare(self, residency, device: str) -> None:
        super().prepare(residency, device)
        if self.measured is None:
            self.cpu_layers = self.n_host // 2

    def describe(self):
        how = "measured" if self.measured else "unmeasured"
        ex = f", {self.decode_experts} routed experts uploaded per step" if self.experts_measured else ""
        sh = f", device share {self.share:.2f} of their FFN" if self.share else ""
        return (f"auto(decode: cpu {self.cpu_layers} of {self.n_host} host layers{sh}, {how}{ex}; "
                f"threshold {self.threshold})")


class CostModel(UploadPolicy):
    """Upload when moving the weight and computing on the GPU is predicted to beat the CPU.

    Small batches are decided per layer, not per op: copies queue on one link, so streaming every
    layer costs their sum; the model picks the split (CPU computes the first host layers while the
    rest stream) that minimizes max(CPU time, copy time), as LayerSplit runs it."""
    name = "auto"

    def __init__(self, calibration: Calibration, margin: float = 1.0, threshold: int = UPLOAD_THRESHOLD):
        self.cal = calibration
        self.margin = margin
        self.threshold = threshold
        self.split: LayerSplit | None = None

    def prepare(self, residency, device: str) -> None:
        layers: dict[int, list] = {}
        for e in residency:
            if e.layer >= 0 and e.home != device and len(e.shape) == 2 and e.alias_of is None:
                layers.setdefault(e.layer, []).append(e)
        order = sorted(layers)
        cpu = [sum(self.cal.cpu_seconds(e, 1) for e in layers[k]) for k in order]
        copy = [sum(e.nbytes for e in layers[k]) / self.cal.h2d_bytes_per_s for k in order]
        best = min(range(len(order) + 1), key=lambda j: max(sum(cpu[:j]), sum(copy[j:])))
        self.split = LayerSplit(best, self.threshold)
        self.split.first_host_layer = order[0] if order else 0
        self.predicted = (sum(cpu[:best]), sum(copy[best:]), sum(cpu))  # seconds: CPU part, copies, all-CPU

    def should_upload(self, op, entry, n_tokens):
        if n_tokens < self.threshold and self.split is not None:
            return self.split.should_upload(op, entry, n_tokens)
        if entry is None or op is not Op.MATMUL:
            # Small ops follow the batch: the activations are already where the matmuls run.
            return n_tokens >= self.threshold
        return self.cal.gpu_seconds(entry, n_tokens) * self.margin < self.cal.cpu_seconds(entry, n_tokens)

    def describe(self):
        s = f", decode split cpu {self.split.cpu_layers} layers" if self.split is not None else ""
        return f"auto(h2d {self.cal.h2d_bytes_per_s / 1e9:.1f} GB/s{s})"


def make_policy(name: str = "auto", threshold: int = UPLOAD_THRESHOLD, no_op_offload: bool = False,
                calibration: Calibration | None = None, expert_threshold: int | None = None) -> UploadPolicy:
    """The CLI's --policy/--threshold/--expert-threshold/-nopo flags as one policy object."""
    pol = _make_policy(name, threshold, no_op_offload, calibration)
    if expert_threshold is not None:
        if expert_threshold < 1:
            raise ValueError(f"expert threshold must be a positive token count, found {expert_threshold}")
        pol.expert_threshold = expert_threshold
    return pol


def _make_policy(name: str, threshold: int, no_op_offload: bool, calibration: Calibration | None) -> UploadPolicy:
    """("split:N" = LayerSplit(N), "auto" = AutoSplit, "cost" = CostModel on a calibration)."""
    if no_op_offload or name == "never":
        return Never()
    if name == "threshold":
        return BatchThreshold(threshold)
    if name == "always":
        return Always()
    if name.startswith("split"):
        _, _, k = name.partition(":")
        k, _, share = k.partition(":")
        if not k.isdigit():
            raise ValueError(f"policy split needs the CPU's layer count, as split:N or split:N:SHARE, found {name!r}")
        try:
            return LayerSplit(int(k), threshold, float(share or 0))
        except ValueError:
            raise ValueError(f"policy split:N:SHARE needs a share in [0, 1), found {name!r}") from None
    if name == "auto":
        return AutoSplit(threshold)
    if name == "cost":
        if calibration is None:
            raise ValueError("policy 'cost' needs a calibration (run on a machine with a GPU)")
        return CostModel(calibration, threshold=threshold)
    raise ValueError(f"unknown policy {name!r}: expected auto, threshold, never, always, split:N[:SHARE] or cost")
