"""The measurement behind `serve`'s defaults, on the machine it runs on: a `localgemma serve`
for each thread count and `--parallel`, each asked for one stream and then 8 concurrent ones
(the same 128-token greedy completions through `/v1/completions` as bench_peer.py), best of
BENCH_ROUNDS interleaved rounds.

    threads    1, half the physical cores, all of them, and every logical CPU (when more)
    parallel   1, 2, 4, 8 (one shared pool of KV cells: --batch-ctx 4096, the default, holds
               8 of these requests; its size changes memory, not speed)

Prints one row per setting (1-stream decode and time to first token, aggregate tokens/s and
p50 time to first token at 8 streams) and the setting they point to (`recommend`). The defaults table in the README is made
of these rows, one machine at a time: `make bench-defaults`.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROUNDS  # noqa: E402
from bench_peer import _load  # noqa: E402
from bench_server import MODEL_ID, start_server  # noqa: E402

PARALLEL = (1, 2, 4, 8)
LOAD = 8


def thread_counts(physical: int) -> list[int]:
    logical = os.cpu_count() or physical
    return sorted({1, max(1, physical // 2), physical, logical})


def defaults_bench(path: str, physical: int) -> None:
    grid = [(t, p) for t in thread_counts(physical) for p in PARALLEL]
    best = {key: {"decode": 0.0, "ttft1": float("inf"), "agg": 0.0, "ttft": []} for key in grid}
    for _ in range(ROUNDS):  # interleaved: a noisy neighbour hurts every setting alike
        for threads, parallel in grid:
            proc, port = start_server(path, threads, ("--parallel", str(parallel), "--max-queue", "16"))
            try:
                _load(port, MODEL_ID, 1)  # warm
                _, ttfts, decode = _load(port, MODEL_ID, 1)
                agg, load_ttfts, _ = _load(port, MODEL_ID, LOAD)
            finally:
                proc.terminate()
                proc.wait(15)
            b = best[(threads, parallel)]
            b["decode"], b["ttft1"] = max(b["decode"], decode), min(b["ttft1"], ttfts[0])
            b["agg"] = max(b["agg"], agg)
            b["ttft"] += load_ttfts
    print(f"{'threads':>7} {'parallel':>8} {'1-stream tok/s':>15} {'1-stream TTFT ms':>17} "
          f"{f'{LOAD}-stream tok/s':>15} {f'{LOAD}-stream p50 TTFT ms':>22}")
    for (threads, parallel), b in best.items():
        print(f"{threads:>7} {parallel:>8} {b['decode']:>15.1f} {b['ttft1'] * 1e3:>17.1f} {b['agg']:>15.1f} "
              f"{statistics.median(b['ttft']) * 1e3:>22.1f}")
    threads, parallel = recommend({k: (b["decode"], b["agg"]) for k, b in best.items()})
    print(f"on this machine: threads {threads} (fastest single stream), --parallel {parallel} "
          f"(the most tokens/s at {LOAD} streams with those threads)")


def recommend(rates: dict[tuple[int, int], tuple[float, float]]) -> tuple[int, int]:
    """(threads, parallel) from {(threads, parallel): (1-stream tok/s, 8-stream tok/s)}. A single
    stream does not depend on --parallel, so each thread count's single-stream rate is the mean
    over its parallel settings (one noisy server does not decide); then, with those threads,
    the parallel setting that serves the load fastest."""
    counts = sorted({t for t, _ in rates})
    single = {t: statistics.mean(d for (tt, _), (d, _) in rates.items() if tt == t) for t in counts}
    threads = max(counts, key=single.get)
    parallel = max((p for t, p in rates if t == threads), key=lambda p: rates[(threads, p)][1])
    return threads, parallel

if __name__ == "__main__":
    from localgemma import system
    from localgemma.models import resolve

    physical = system.physical_cores()
    print(f"model {resolve(None).name}, {physical} physical cores, {os.cpu_count()} logical, "
          f"best of {ROUNDS} rounds")
    defaults_bench(str(resolve(None)), physical)
