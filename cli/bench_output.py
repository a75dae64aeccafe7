"""Bench rows as llama-bench prints them: markdown, csv, json, jsonl, sql."""
from __future__ import annotations

import csv
import io
import json

FIELDS = ["build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type",
          "model_size", "model_n_params", "n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers",
          "n_cpu_moe", "no_op_offload", "flash_attn", "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns",
          "avg_ts", "stddev_ts", "policy", "threshold", "moe_share", "bytes_streamed", "stream_gbps", "copy_hidden"]
INT_FIELDS = {"build_number", "model_size", "model_n_params", "n_batch", "n_ubatch", "n_threads", "n_gpu_layers", "n_cpu_moe",
              "no_op_offload", "flash_attn", "n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "threshold",
              "bytes_streamed"}
# Column header in markdown for a varied parameter.
MD_NAMES = {"n_batch": "n_batch", "n_ubatch": "n_ubatch", "n_threads": "threads", "n_gpu_layers": "ngl", "n_cpu_moe": "n_cpu_moe",
            "no_op_offload": "nopo", "flash_attn": "fa", "policy": "policy", "threshold": "threshold",
            "moe_share": "moe-share"}


def fmt_size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def markdown_header(varied: list[str], gpu: bool) -> str:
    cols = ["model", "size", "params", "backend", "ngl" if gpu else "threads"]
    cols += [MD_NAMES[v] for v in varied if MD_NAMES[v] not in cols]
    cols += ["test", "t/s"]
    right = {"size", "params", "ngl", "threads", "t/s", "n_batch", "n_ubatch", "threshold", "nopo", "fa"}
    line = "| " + " | ".join(cols) + " |"
    sep = "| " + " | ".join(("-" * (len(c) - 1) + ":") if c in right else "-" * len(c) for c in cols) + " |"
    return line + "\n" + sep


def markdown_row(row: dict, varied: list[str], gpu: bool, test: str) -> str:
    cells = [row["model_type"], fmt_size(row["model_size"]), fmt_params(row["model_n_params"]), row["backends"],
             str(row["n_gpu_layers"] if gpu else row["n_threads"])]
    shown = {"n_gpu_layers" if gpu else "n_threads"}
    cells += [str(row[v]) for v in varied if v not in shown]
    cells += [test, f"{row['avg_ts']:.2f} ± {row['stddev_ts']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def csv_text(rows: list[dict], header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def json_text(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2) + "\n"


def jsonl_line(row: dict) -> str:
    return json.dumps(row) + "\n"


def sql_create() -> str:
    cols = ",\n".join(f"  {f} {'INTEGER' if f in INT_FIELDS else ('REAL' if f in ('avg_ts', 'stddev_ts', 'stream_gbps', 'copy_hidden') else 'TEXT')}"
                      for f in FIELDS)
    return f"CREATE TABLE IF NOT EXISTS test (\n{cols}\n);\n"


def sql_insert(row: dict) -> str:
    def lit(v):
        if v is None:
            return "NULL"
        if isinstance(v, (int, float)):
            return repr(v)
        return "'" + str(v).replace("'", "''") + "'"
    return f"INSERT INTO test ({', '.join(FIELDS)}) VALUES ({', '.join(lit(row.get(f)) for f in FIELDS)});\n"
