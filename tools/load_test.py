"""A bounded load test of an OpenAI-compatible server (`lstream serve`, llama-server) with the
official `openai` client: at each concurrency level, that many clients each send --requests
requests, one after another, each with a timeout; the level stops by itself when every client is
done. Reports errors (must be 0), incomplete responses, p50/p99 latency and aggregate generated
tokens per second; --same checks that every prompt got the same greedy text at every level as at
the first one; --json keeps the numbers and --plot draws throughput against concurrency (one line
per JSON file given to --plot-from: lstream against llama-server).

    python tools/load_test.py --base-url http://127.0.0.1:8080/v1 -c 32 -r 8           # 32 x 8
    python tools/load_test.py --base-url URL -c 1,8 --total 8 --same             # alone, then 8 at once
    python tools/load_test.py --base-url URL -c 1,2,4,8 -r 2 --same --json lstream.json --label lstream
    python tools/load_test.py --plot-from lstream.json llama.json --plot throughput.png

Needs `openai` (the test extra) and, for --plot, matplotlib."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten-year-old.",
    "List some interesting facts about the ocean.",
    "Describe a walk through a forest in autumn.",
    "What are the benefits of learning a second language?",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue.",
    "Give advice to someone starting their first job.",
]


def one_request(client, model: str, prompt: str, max_tokens: int, timeout: float, chat: bool) -> dict:
    t0 = time.perf_counter()
    try:
        kw = dict(model=model, max_tokens=max_tokens, temperature=0, timeout=timeout,
                  extra_body={"ignore_eos": True})
        if chat:
            r = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
            text = r.choices[0].message.content or ""
        else:
            r = client.completions.create(prompt=prompt, **kw)
            text = r.choices[0].text or ""
        reason = r.choices[0].finish_reason
        n = r.usage.completion_tokens if r.usage else 0
        complete = reason in ("stop", "length") and n == max_tokens and bool(text)
        return {"ok": True, "complete": complete, "tokens": n, "text": text, "latency": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the test
        return {"ok": False, "complete": False, "tokens": 0, "text": "", "latency": time.perf_counter() - t0,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}


def run_level(base_url: str, model: str, clients: int, requests: int, max_tokens: int, timeout: float,
              chat: bool) -> dict:
    """`clients` threads, each with its own client, `requests` requests each; prompt k of client c
    is PROMPTS[(c + k) % len(PROMPTS)]."""
    from openai import OpenAI
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def client_main(c: int) -> None:
        client = OpenAI(base_url=base_url, api_key="none", max_retries=0)
        for k in range(requests):
            i = (c + k) % len(PROMPTS)
            r = one_request(client, model, PROMPTS[i], max_tokens, timeout, chat)
            with lock:
                results.append((i, r))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_main, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout * requests + 60)
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for _, r in results if r["ok"])
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    tokens = sum(r["tokens"] for _, r in results)
    errors = [r["error"] for _, r in results if not r["ok"]]
    texts: dict[int, list[str]] = {}
    for i, r in results:
        if r["ok"]:
            texts.setdefault(i, []).append(r["text"])
    return {"clients": clients, "requests": clients * requests, "done": len(results), "errors": len(errors),
            "error_samples": errors[:3], "incomplete": sum(1 for _, r in results if r["ok"] and not r["complete"]),
            "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
            "p50_s": pct(0.5), "p99_s": pct(0.99), "texts": texts}


def same_outputs(levels: list[dict]) -> list[str]:
    """Prompts whose greedy text differs between requests or from the first level's."""
    ref = {i: t[0] for i, t in levels[0]["texts"].items()}
    bad = []
    for lv in levels:
        for i, ts in lv["texts"].items():
            if any(t != ref.get(i, t) for t in ts):
                bad.append(f"prompt {i} at {lv['clients']} clients")
    return bad


def plot(files: list[str], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for f in files:
        d = json.loads(Path(f).read_text())
        xs = [lv["clients"] for lv in d["levels"]]
        ax.plot(xs, [lv["tokens_per_s"] for lv in d["levels"]], marker="o", label=d.get("label", Path(f).stem))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate generated tokens/s")
    ax.set_title(d.get("title", "throughput against concurrency"))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--model", default="default")
    ap.add_argument("-c", "--clients", default="32", help="concurrency levels, comma-separated")
    ap.add_argument("-r", "--requests", type=int, default=8, help="requests per client at each level")
    ap.add_argument("--total", type=int, default=None,
                    help="requests per level, shared by its clients (-c 1,8 --total 8: the same 8 prompts one "
                         "at a time, then all at once)")
    ap.add_argument("-n", "--max-tokens", type=int, default=48)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--completions", action="store_true", help="/v1/completions instead of chat")
    ap.add_argument("--same", action="store_true", help="check the greedy texts agree across levels")
    ap.add_argument("--label", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="PNG of tokens/s against concurrency")
    ap.add_argument("--plot-from", nargs="*", default=None, help="JSON files to plot (instead of running)")
    a = ap.parse_args(argv)
    need = (["matplotlib"] if a.plot or a.plot_from else []) + ([] if a.plot_from else ["openai"])
    for mod in need:  # one line, not a traceback, where the test extra is not installed
        try:
            __import__(mod)
        except ImportError:
            print(f"error: tools/load_test.py needs {mod}: pip install -e '.[test]' (or pip install {mod})",
                  file=sys.stderr)
            return 1
    if a.plot_from:
        plot(a.plot_from, a.plot or "throughput.png")
        return 0
    levels = []
    for c in [int(x) for x in a.clients.split(",")]:
        per = a.requests if a.total is None else max(1, a.total // c)
        lv = run_level(a.base_url, a.model, c, per, a.max_tokens, a.timeout, not a.completions)
        levels.append(lv)
        print(f"{c:3d} clients x {per} requests: {lv['done']}/{lv['requests']} done, {lv['errors']} errors, "
              f"{lv['incomplete']} incomplete, {lv['tokens']} tokens in {lv['wall_s']:.1f} s = "
              f"{lv['tokens_per_s']:.1f} t/s, latency p50 {lv['p50_s']:.2f} s p99 {lv['p99_s']:.2f} s", flush=True)
        for e in lv["error_samples"]:
            print(f"    error: {e}", flush=True)
    bad = same_outputs(levels) if a.same else []
    if a.same:
        print("same greedy outputs at every level" if not bad else "different outputs: " + ", ".join(bad[:8]))
    if a.json:
        keep = [{k: v for k, v in lv.items() if k != "texts"} for lv in levels]
        Path(a.json).write_text(json.dumps({"label": a.label or a.base_url, "max_tokens": a.max_tokens,
                                            "levels": keep}, indent=1))
    if a.plot:
        tmp = Path(a.json) if a.json else None
        if tmp is None:
            tmp = Path(a.plot).with_suffix(".json")
            tmp.write_text(json.dumps({"label": a.label or a.base_url,
                                       "levels": [{k: v for k, v in lv.items() if k != "texts"} for lv in levels]}))
        plot([str(tmp)], a.plot)
    failed = any(lv["errors"] or lv["incomplete"] or lv["done"] < lv["requests"] for lv in levels) or bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
