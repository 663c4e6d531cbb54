"""KV cache types (`--kv-type`): what q8_0 and q4_0 cost in speed and in quality, against f16,
in one run on the same GGUF and threads.

    decode tok/s    128 greedy tokens, best of ROUNDS         ratio: type / f16
    prefill tok/s   the bench's prefill text                  ratio: type / f16
    KV MiB          the cache at the bench's context          ratio: type / f16
    KL vs f16       teacher-forced over a fixed text (mean, max per position), top-1 agreement

`python bench/bench_kv.py` runs it alone; `make bench` runs it after the other sections.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DECODE_PROMPT, N_CTX, N_DECODE, PREFILL_TEXT, ROUNDS, row, setup  # noqa: E402

# A fixed text for the quality check: varied prose, long enough that positions far from the
# start (where quantized keys accumulate error) are measured too.
QUALITY_TEXT = (
    "The river rises in the hills above the town and runs south for forty miles before it meets the sea. "
    "In spring the snowmelt fills it to the banks; by August children wade across where the ferry used to run. "
    "The old mill stands at the second bend. It was built in 1794, burned in 1861 and rebuilt in stone, and it "
    "ground wheat until the railway came. Today it is a museum, open on weekends, with a working water wheel "
    "and a room of tools whose uses nobody quite remembers. Ask the keeper about the flood of 1927 and she will "
    "show you the line on the wall, higher than your head, and the photograph of the bridge that was not there "
    "the next morning. "
) * 3


def softmax_log(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kv_bench(path: str, threads: int) -> None:
    from localgemma import memory
    from localgemma.engine import Engine
    from localgemma.generation import GenerationRequest
    from localgemma.sampling import SamplingParams

    shape = memory.shape_of(path)
    greedy = SamplingParams(temperature=0)
    results, reference = {}, None
    for kv_type in ("f16", "q8_0", "q4_0"):
        engine = Engine(path, n_ctx=N_CTX, n_threads=threads, kv_type=kv_type)
        decode_ids = engine.tokenize(DECODE_PROMPT, add_bos=True)
        prefill_ids = engine.tokenize(PREFILL_TEXT, add_bos=True)
        quality_ids = engine.tokenize(QUALITY_TEXT, add_bos=True)[:N_CTX // 2]

        def timed(ids, n):
            start = time.perf_counter()
            stream = engine.generate(GenerationRequest(tuple(ids), greedy, n))
            next(stream)
            first = time.perf_counter()
            list(stream)
            return first - start, time.perf_counter() - first

        decode = min(timed(decode_ids, N_DECODE)[1] for _ in range(ROUNDS))
        prefill = min(timed(prefill_ids, 1)[0] for _ in range(ROUNDS))
        logp = softmax_log(engine.logits(quality_ids).astype(np.float64))
        engine.close()
        if reference is None:
            reference = logp
        p = np.exp(reference)
        kl = (p * (reference - logp)).sum(axis=-1)
        top1 = float((reference.argmax(-1) == logp.argmax(-1)).mean())
        kv_mib = N_CTX * shape.kv_per_cell(kv_type) / memory.MiB
        results[kv_type] = ((N_DECODE - 1) / decode, len(prefill_ids) / prefill, kv_mib, float(kl.mean()),
                            float(kl.max()), top1, len(quality_ids))
    base = results["f16"]
    for kv_type in ("q8_0", "q4_0"):
        dec, pre, mib, kl_mean, kl_max, top1, n = results[kv_type]
        row(f"{kv_type} decode tok/s", dec, base[0], "tok/s")
        row(f"{kv_type} prefill tok/s", pre, base[1], "tok/s")
        row(f"{kv_type} KV MiB at {N_CTX} tokens", mib, base[2], "MiB", higher_is_better=False)
        print(f"{kv_type + ' vs f16 over ' + str(n) + ' tokens':34} KL mean {kl_mean:.5f}  max {kl_max:.4f}  "
              f"top-1 agreement {top1:.2%}")


if __name__ == "__main__":
    path, threads = setup("type", "f16")
    kv_bench(path, threads)
