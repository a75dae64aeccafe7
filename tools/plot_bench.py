"""Draw `lstream bench -o json` (or jsonl) results as PNG: t/s against a swept parameter
(-ngl, -ub, -t, ...), one line per policy (and per test: pp/tg), one panel per test kind.

    lstream bench -p 512 -n 128 -ub 64,128,256,512 -o json > bench.json
    python tools/plot_bench.py bench.json -x n_ubatch -o bench.png

Needs matplotlib: `pip install -e '.[plot]'` (or `pip install matplotlib`)."""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

X_NAMES = {"ngl": "n_gpu_layers", "ub": "n_ubatch", "t": "n_threads", "b": "n_batch", "threshold": "threshold"}


def load_rows(path: str) -> list[dict]:
    text = Path(path).read_text() if path != "-" else sys.stdin.read()
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def test_name(r: dict) -> str:
    pp, tg, d = r.get("n_prompt", 0), r.get("n_gen", 0), r.get("n_depth", 0)
    name = f"pp{pp}+tg{tg}" if pp and tg else (f"pp{pp}" if pp else f"tg{tg}")
    return name + (f" @ d{d}" if d else "")


def pick_x(rows: list[dict]) -> str:
    """The swept parameter: the first of -ngl, -ub, -t, -b, --threshold taking more than one value."""
    for key in ("n_gpu_layers", "n_ubatch", "n_threads", "n_batch", "threshold"):
        if len({r.get(key) for r in rows}) > 1:
            return key
    return "n_gpu_layers"


def series(rows: list[dict], x: str) -> dict[str, dict[str, list[tuple]]]:
    """{test: {line label: [(x, avg_ts, stddev_ts), ...] sorted by x}}; a line per policy and model."""
    out: dict[str, dict[str, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    models = {r.get("model_type") for r in rows}
    for r in rows:
        label = str(r.get("policy", "")) + (f" {r.get('model_type')}" if len(models) > 1 else "")
        out[test_name(r)][label.strip() or "lstream"].append((r[x], r["avg_ts"], r.get("stddev_ts", 0.0)))
    return {t: {k: sorted(v) for k, v in lines.items()} for t, lines in out.items()}


def plot(rows: list[dict], out: str, x: str | None = None, title: str | None = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = X_NAMES.get(x, x) if x else pick_x(rows)
    data = series(rows, x)
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.4), squeeze=False, dpi=90)
    for ax, (test, lines) in zip(axes[0], data.items()):
        for label, pts in lines.items():
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        xs_all = sorted({p[0] for ls in lines.values() for p in ls})
        if x in ("n_ubatch", "n_batch") and len(xs_all) > 2:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [str(v) for v in xs_all])
        ax.set_xlabel(x)
        ax.set_ylabel("tokens / s")
        ax.set_title(test)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(title or f"{r0.get('model_type', '')} on {r0.get('backends', '')} "
                 f"({r0.get('cpu_info', '')}{', ' + r0['gpu_info'] if r0.get('gpu_info') else ''})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="lstream bench -o json / jsonl output ('-' for stdin)")
    ap.add_argument("-x", default=None, help="parameter on the x axis: ngl, ub, t, b, threshold (default: the swept one)")
    ap.add_argument("-o", "--out", default="bench.png")
    ap.add_argument("--title", default=None)
    a = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("error: tools/plot_bench.py needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)")
    try:
        rows = load_rows(a.json)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {a.json}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not rows:
        sys.exit(f"error: no bench rows in {a.json}")
    print(plot(rows, a.out, a.x, a.title))


if __name__ == "__main__":
    main()
