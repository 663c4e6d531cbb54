"""The server's cost: the same greedy stream through `localgemma serve` (HTTP + SSE) and
in-process (`localgemma.runtime.run`), interleaved, best of several rounds. Each request has a
prompt of its own (bench.unique_prompt): the server's batch context keeps a prefix cache, and
a repeated prompt would measure that instead of the server.

    TTFT           request sent -> first token received   target: HTTP - in-process <= 5 ms
    decode tok/s   tokens after the first / their time     target: HTTP / in-process >= 0.97

`server_bench(path, threads)` prints rows in bench.py's format (HTTP in the first column,
in-process in the second); `make bench` calls it, or run this file alone.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import N_DECODE, ROUNDS, row, setup, unique_prompt  # noqa: E402

MODEL_ID = "@localgemma/bench"
REQUEST = {"raw": True, "temperature": 0, "max_tokens": N_DECODE, "stream": True}


def server_bench(path: str, threads: int) -> None:
    os.environ["LOCALGEMMA_THREADS"] = str(threads)  # the in-process engine, like the server's
    server, port = start_server(path, threads)
    try:
        http_run = lambda: _http_stream(port)  # noqa: E731
        local_run = lambda: _local_stream(path)  # noqa: E731
        http_run(), local_run()  # warm both: first requests pay one-off costs
        best = {"ht": float("inf"), "lt": float("inf"), "hd": float("inf"), "ld": float("inf")}
        for _ in range(ROUNDS):  # interleaved, so a noisy neighbour hurts both sides alike
            for side, fn in (("h", http_run), ("l", local_run)):
                ttft, decode = fn()
                best[side + "t"], best[side + "d"] = min(best[side + "t"], ttft), min(best[side + "d"], decode)
    finally:
        server.terminate()
        server.wait(15)
    row("server TTFT (ms), HTTP vs in-proc", best["ht"] * 1e3, best["lt"] * 1e3, "ms", higher_is_better=False)
    row(f"server decode tok/s ({N_DECODE} tokens)", (N_DECODE - 1) / best["hd"], (N_DECODE - 1) / best["ld"], "tok/s")
    # ratio column: the 5 ms budget over the overhead spent (>= 1 is within target)
    row("server TTFT overhead (ms), vs 5", max((best["ht"] - best["lt"]) * 1e3, 1e-3), 5.0, "ms",
        higher_is_better=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: str, threads: int, flags: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """A `localgemma serve` process for `path` on a free loopback port, once /health says ready."""
    port = free_port()
    env = {**os.environ, "LOCALGEMMA_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "localgemma.server", "--port", str(port),
                             "--model", f"{MODEL_ID}={path}", *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(proc, port, "the server")


def wait_ready(proc: subprocess.Popen, port: int, name: str) -> tuple[subprocess.Popen, int]:
    """(proc, port) once GET /health answers 200; RuntimeError if `name` exits or takes 120 s."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; run it by hand to see why")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError(f"{name} did not become ready within 120 s")


def _http_stream(port: int) -> tuple[float, float]:
    """(time to first token, time from first to last token) for one streamed request, on a
    fresh connection (its connect time counts: a client pays it)."""
    body = json.dumps({**REQUEST, "prompt": unique_prompt()})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", f"/client/v4/accounts/bench/ai/run/{MODEL_ID}", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first = last = None
    n = 0
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: {\"response\":\"") or line.startswith(b"data: {\"response\":\"\",\"usage\""):
            continue
        last = time.perf_counter()
        first = first or last
        n += 1
    conn.close()
    assert n >= N_DECODE * 0.9, f"expected {N_DECODE} text events, got {n}"
    return first - start, (last - first) / (n - 1) * (N_DECODE - 1)


def _local_stream(path: str) -> tuple[float, float]:
    import localgemma

    request = {**REQUEST, "prompt": unique_prompt()}
    start = time.perf_counter()
    first = last = None
    n = 0
    for chunk in localgemma.run(path, request):
        if chunk["response"]:
            last = time.perf_counter()
            first = first or last
            n += 1
    assert n >= N_DECODE * 0.9, f"expected {N_DECODE} text chunks, got {n}"
    return first - start, (last - first) / (n - 1) * (N_DECODE - 1)


def main() -> None:
    server_bench(*setup('HTTP', 'in-process'))


if __name__ == "__main__":
    main()
