"""Where the time went: a per-phase table per layer (--profile) and a Chrome/Perfetto trace (--trace).

Both read the executor's `Profile`: phase totals (`seconds`, filled by the executor and the device
backend's streamer), per-layer seconds (`layer_seconds`) and, when a trace is asked for, spans.
Phases as the table names them:

  copy to GPU    weights streamed host -> device (device-side copy time, copy stream)
  wait for copy  compute waiting for a weight that had not arrived yet (copy not hidden)
  GPU compute    ops on a device backend (synchronized op by op while profiling)
  CPU compute    ops on the CPU backend
  hop            activations crossing between backends at split boundaries
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager

from .executor import Profile
from .residency import HOST

PHASES = ("copy to GPU", "wait for copy", "GPU compute", "CPU compute", "hop")
# Trace tracks (Chrome "threads"): one per stream.
TRACKS = {"CPU": 1, "GPU compute stream": 2, "copy stream": 3}


def phase_of(name: str) -> str | None:
    """The table's phase for one of the names the executor and the backends record."""
    if name == "hop":
        return "hop"
    if name == f"{HOST} compute":
        return "CPU compute"
    if name.endswith(" compute"):
        return "GPU compute"
    if "stall" in name or name.startswith("wait"):
        return "wait for copy"
    if "copy" in name or "upload" in name:
        return "copy to GPU"
    return None


def track_of(track: str) -> str:
    if track == HOST:
        return "CPU"
    if track in ("hop", "copy") or "copy" in track or "upload" in track:
        return "copy stream"
    return "GPU compute stream"


def layer_label(layer: int, n_layer: int) -> str:
    return "embd" if layer < 0 else ("output" if layer >= n_layer else str(layer))


def totals(prof: Profile) -> dict[str, float]:
    out = dict.fromkeys(PHASES, 0.0)
    for name, s in prof.seconds.items():
        ph = phase_of(name)
        if ph:
            out[ph] += s
    return out


def per_layer(prof: Profile) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for (layer, name), s in prof.layer_seconds.items():
        ph = phase_of(name)
        if ph:
            rows.setdefault(layer, dict.fromkeys(PHASES, 0.0))[ph] += s
    return dict(sorted(rows.items()))


def table(prof: Profile, n_layer: int, title: str = "") -> str:
    """Milliseconds per phase, one row per layer and a total row (phase totals from the backends,
    which also count copies they could not attribute to a layer)."""
    w = 14
    head = f"{'layer':>6} " + " ".join(f"{p:>{w}}" for p in PHASES) + f" {'total':>{w}}"
    lines = [f"profile{': ' + title if title else ''} (ms)", head, "-" * len(head)]
    for layer, row in per_layer(prof).items():
        lines.append(f"{layer_label(layer, n_layer):>6} " + " ".join(f"{row[p] * 1e3:>{w}.2f}" for p in PHASES)
                     + f" {sum(row.values()) * 1e3:>{w}.2f}")
    tot = totals(prof)
    lines.append("-" * len(head))
    lines.append(f"{'total':>6} " + " ".join(f"{tot[p] * 1e3:>{w}.2f}" for p in PHASES)
                 + f" {sum(tot.values()) * 1e3:>{w}.2f}")
    lines.append(f"bytes streamed to the device {prof.bytes_uploaded / 2**20:.1f} MiB, "
                 f"hopped between backends {prof.bytes_hopped / 2**20:.1f} MiB")
    looked = prof.counts.get("expert cache lookups", 0)
    if looked:
        hits = prof.counts.get("expert cache hits", 0)
        lines.append(f"expert cache: {hits} of {looked} routed experts found in VRAM ({100 * hits / looked:.1f}% hits)")
    return "\n".join(lines)


def trace_events(prof: Profile, n_layer: int, pid: int = 1) -> list[dict]:
    """Chrome trace events: metadata naming the three tracks, then one complete ("X") event per
    span (consecutive ops of one layer on one track are one span), timestamps in microseconds."""
    ev: list[dict] = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "lstream"}}]
    for name, tid in TRACKS.items():
        ev.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        ev.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    spans = prof.spans or []
    t_origin = min((s[2] for s in spans), default=0.0)
    for track, phase, t0, t1, layer in spans:
        label = layer_label(layer, n_layer)
        ph = phase_of(phase) or phase
        ev.append({"name": f"{ph} {'layer ' + label if label.isdigit() else label}", "cat": ph, "ph": "X",
                   "pid": pid, "tid": TRACKS[track_of(track)], "ts": round((t0 - t_origin) * 1e6, 3),
                   "dur": round(max(t1 - t0, 0.0) * 1e6, 3), "args": {"layer": layer, "phase": phase}})
    return ev


def write_trace(prof: Profile, n_layer: int, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": trace_events(prof, n_layer), "displayTimeUnit": "ms",
                   "otherData": {"producer": "lstream", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}}, f)


def start(model, trace: bool = False, sync_device: bool = True) -> Profile:
    """Attach a fresh Profile to the model (spans kept only when a trace will be written)."""
    model.profile = Profile(spans=[] if trace else None, sync_device=sync_device)
    return model.profile


@contextmanager
def profiling(model, enabled: bool = True, trace_path=None, echo=print, title: str = ""):
    """Profile everything the block runs on `model`; print the table and/or write the trace after."""
    if not enabled and not trace_path:
        yield None
        return
    prof = start(model, trace=bool(trace_path))
    try:
        yield prof
    finally:
        model.profile = None
        n_layer = model.config.n_layer
        if enabled:
            echo(table(prof, n_layer, title))
        if trace_path:
            write_trace(prof, n_layer, trace_path)
            echo(f"trace: {trace_path} ({len(prof.spans or [])} spans; open in https://ui.perfetto.dev)")
