"""localgemma against llama-server, side by side: the same GGUF, threads, parallel slots and KV
cells, one server at a time on loopback, streaming 128-token completions through
`/v1/completions` (both speak it), interleaved rounds, best of each.

    TTFT, 1 stream            request sent -> first token, the median of FIRSTS requests a
                              round, one at a time           target: <= llama-server's + 2 ms
                              (and the best of them all, for reference)
    decode tok/s, 1 stream    tokens after the first / time  target: >= 0.98 x
    aggregate tok/s, N        all tokens / wall time, N = 1, 2, 4, 8 concurrent streams
                                                              target at 8: >= 1.0 x
    p50 / p95 TTFT, N         over every request of the rounds at N streams
                                                              target: p50 at 8 <= llama-server's

Every request has a prompt of its own ("Verse N: la la ...", bench.unique_prompt): both keep a
prefix cache (llama-server each slot's last prompt, localgemma its batch context's finished
sequences) and reuse it for a request that starts the same way, which with one repeated prompt
would measure that cache rather than serving.

llama-server is built from the llama.cpp that the installed llama-cpp-python vendors
(bench/llama_server.py; bench only, cached per version and flags). Both get greedy decoding
and a prompt greedy never ends early, so every stream decodes exactly 128 tokens.

`make bench-peer` runs it alone (with the Makefile's CMAKE_ARGS: llama-server built without them
can die of SIGILL where the VM advertises AMX); `make bench` runs it too.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import N_DECODE, ROUNDS, row, setup, unique_prompt  # noqa: E402
from bench_server import MODEL_ID, free_port, start_server, wait_ready  # noqa: E402

LEVELS = (1, 2, 4, 8)
PARALLEL = max(LEVELS)
KV_CELLS = 8192  # both: one pool shared by the slots (llama-server: -c 8192 -np 8 --kv-unified)
FIRSTS = 10  # single requests a round for the TTFT row: its median moves far less than a best of 3


def peer_bench(path: str, threads: int) -> None:
    from llama_server import llama_server

    binary = llama_server()
    sides = {
        "ours": lambda: start_server(path, threads, ("--parallel", str(PARALLEL), "--batch-ctx", str(KV_CELLS),
                                                     "--max-queue", "16")),
        "theirs": lambda: _start_llama_server(binary, path, threads),
    }
    results = {side: {"ttft": {n: [] for n in LEVELS}, "agg": {n: 0.0 for n in LEVELS}, "decode": 0.0,
                      "first": []} for side in sides}
    for _ in range(ROUNDS):  # interleaved: a noisy neighbour hurts both alike
        for side, start in sides.items():
            proc, port = start()
            try:
                model = MODEL_ID if side == "ours" else "model"
                _load(port, model, 1)  # warm: first requests pay one-off costs
                for n in LEVELS:
                    agg, ttfts, decode = _load(port, model, n)
                    r = results[side]
                    r["agg"][n] = max(r["agg"][n], agg)
                    r["ttft"][n] += ttfts
                    if n == 1:
                        r["decode"] = max(r["decode"], decode)
                r["first"] += [_stream(port, model, max_tokens=4)[1] for _ in range(FIRSTS)]
            finally:
                proc.terminate()
                proc.wait(15)
    ours, theirs = results["ours"], results["theirs"]
    median_ttft = lambda r: statistics.median(r["first"]) * 1e3  # noqa: E731
    best_ttft = lambda r: min(r["first"] + r["ttft"][1]) * 1e3  # noqa: E731
    row("1 stream: TTFT, median (ms)", median_ttft(ours), median_ttft(theirs), "ms", higher_is_better=False)
    row("1 stream: TTFT, best (ms)", best_ttft(ours), best_ttft(theirs), "ms", higher_is_better=False)
    row("1 stream: decode tok/s", ours["decode"], theirs["decode"], "tok/s")
    for n in LEVELS:
        row(f"{n} stream{'s' if n > 1 else ''}: aggregate tok/s", ours["agg"][n], theirs["agg"][n], "tok/s")
    for n in LEVELS[1:]:
        for q, name in ((50, "p50"), (95, "p95")):
            row(f"{n} streams: {name} TTFT (ms)", _pct(ours["ttft"][n], q) * 1e3, _pct(theirs["ttft"][n], q) * 1e3,
                "ms", higher_is_better=False)


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _start_llama_server(binary: str, path: str, threads: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([binary, "-m", path, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                             "-tb", str(threads), "-c", str(KV_CELLS), "-np", str(PARALLEL), "--kv-unified",
                             "-b", "512", "-ub", "512", "--no-webui", "--alias", "model"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(proc, port, "llama-server")


def _load(port: int, model: str, n: int) -> tuple[float, list[float], float]:
    """n concurrent streams: (aggregate tok/s, each TTFT, the first stream's decode tok/s)."""
    out: list = [None] * n
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        out[i] = _stream(port, model)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[0] for r in out)
    first = out[0]
    return tokens / wall, [r[1] for r in out], (first[0] - 1) / first[2]


def _stream(port: int, model: str, max_tokens: int = N_DECODE) -> tuple[int, float, float]:
    """(tokens, time to first token, first -> last token) for one streamed completion."""
    body = json.dumps({"model": model, "prompt": unique_prompt(), "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()[:300]
    first = last = None
    tokens = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("choices") and event["choices"][0].get("text"):
            last = time.perf_counter()
            first = first or last
            tokens += 1
    conn.close()
    assert tokens >= max_tokens * 0.9, f"only {tokens} pieces streamed"
    return max_tokens, first - start, last - first


if __name__ == "__main__":
    path, threads = setup("localgemma", "llama-server")
    peer_bench(path, threads)
