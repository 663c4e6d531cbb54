"""Batched decoding over HTTP: aggregate decode tok/s at 1, 2, 4 and 8 concurrent streaming
requests, a `--parallel 8` server against a one-at-a-time `--exact` server on the same GGUF in
the same run, and p50 time to first token under that load.

    aggregate tok/s   all streams' tokens / wall time      target at 8 streams: >= 1.8 x 1 stream
    p50 TTFT          median over the streams               reported

`batch_bench(path, threads)` prints rows in bench.py's format (batched in the first column,
exact in the second); `python bench/bench_batch.py` runs it alone (`make bench` runs both).
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import N_DECODE, ROUNDS, row, setup, unique_prompt  # noqa: E402
from bench_server import MODEL_ID, start_server  # noqa: E402

LEVELS = (1, 2, 4, 8)


def batch_bench(path: str, threads: int) -> None:
    results = {}
    for name, flags in (("batched", ["--parallel", str(max(LEVELS))]), ("exact", ["--exact"])):
        proc, port = start_server(path, threads, ("--max-queue", "16", *flags))
        try:
            _load(port, 1)  # warm: first requests pay one-off costs
            results[name] = {n: _best(port, n) for n in LEVELS}
        finally:
            proc.terminate()
            proc.wait(15)
    for n in LEVELS:
        (bt, bf), (et, ef) = results["batched"][n], results["exact"][n]
        row(f"aggregate tok/s, {n} stream{'s' if n > 1 else ''}", bt, et, "tok/s")
        row(f"p50 TTFT (ms), {n} stream{'s' if n > 1 else ''}", bf * 1e3, ef * 1e3, "ms", higher_is_better=False)
    top = max(LEVELS)
    # ratio column: the speedup over the 1.8x target (>= 1 meets it)
    row(f"batched x{top} / x1 speedup, vs 1.8", results["batched"][top][0] / results["batched"][1][0], 1.8, "x")


def _best(port: int, n: int) -> tuple[float, float]:
    """Best aggregate tok/s over ROUNDS, with the p50 TTFT of that round."""
    return max((_load(port, n) for _ in range(ROUNDS)), key=lambda r: r[0])


def _load(port: int, n: int) -> tuple[float, float]:
    out: list = [None] * n
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, _stream(port, i, start))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(end for _, end, _ in out)
    return sum(k for _, _, k in out) / wall, statistics.median(first for first, _, _ in out)


def _stream(port: int, i: int, start: float) -> tuple[float, float, int]:
    """(first token, last token) seconds after `start`, and tokens, for one streamed request."""
    # A prompt of its own per request (greedy never stops on it): the batch context's prefix
    # cache is not what this measures.
    body = {"prompt": unique_prompt(), "raw": True, "temperature": 0, "max_tokens": N_DECODE, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", f"/client/v4/accounts/bench/ai/run/{MODEL_ID}", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first = last = None
    n = 0
    for line in iter(response.readline, b""):
        if line.startswith(b'data: {"response":"') and not line.startswith(b'data: {"response":"","usage"'):
            last = time.perf_counter() - start
            first = first or last
            n += 1
    conn.close()
    return first, last, n


def main() -> None:
    batch_bench(*setup('batched', 'exact (1 at a time)'))


if __name__ == "__main__":
    main()
