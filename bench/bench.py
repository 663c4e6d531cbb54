"""`make bench`: localgemma against plain llama-cpp-python on the same GGUF, same threads,
same run. Ratios, not absolute numbers, are the targets: this machine is shared and noisy,
so each figure is the best of several interleaved rounds.

    decode tok/s   target: localgemma / llama-cpp-python >= 0.97
    prefill tok/s  reported with its ratio
    cold start     process start -> first token -> exit, both stacks: the Python API
                   (localgemma.run) and the command (`localgemma run`), each against
                   llama_cpp.Llama in a fresh `python -c`; target >= 0.95. The same work on
                   both sides: "Hi" as written (raw: no chat template), one token
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))
N_DECODE = 128
N_CTX = 2048
DECODE_PROMPT = "la la la la la la la la"  # greedy never stops here: every run decodes N tokens
PREFILL_TEXT = "The history of the printing press begins in the fifteenth century. " * 40


_VERSES = itertools.count(1)


def unique_prompt() -> str:
    """DECODE_PROMPT after "Verse N: ", N new each call: no two requests share more than a few
    leading tokens, so neither side's prefix cache (localgemma's batch context, llama-server's
    slots) answers for them, and a bench measures serving, not that cache."""
    return f"Verse {next(_VERSES)}: {DECODE_PROMPT}"


def row(name: str, ours: float, theirs: float, unit: str, higher_is_better: bool = True) -> None:
    ratio = ours / theirs if higher_is_better else theirs / ours
    print(f"{name:34} {ours:10.2f} {theirs:18.2f} {unit:6} {ratio:7.3f}")


def runtime_bench(path: str, threads: int) -> None:
    import llama_cpp

    from localgemma.engine import Engine
    from localgemma.generation import GenerationRequest
    from localgemma.sampling import SamplingParams

    ours = Engine(path, n_ctx=N_CTX, n_threads=threads)
    theirs = llama_cpp.Llama(path, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                             n_batch=ours.n_batch, verbose=False)
    greedy = SamplingParams(temperature=0)
    decode_ids = ours.tokenize(DECODE_PROMPT, add_bos=True)
    prefill_ids = ours.tokenize(PREFILL_TEXT, add_bos=True)

    def ours_run(ids, n):
        start = time.perf_counter()
        stream = ours.generate(GenerationRequest(tuple(ids), greedy, n))
        next(stream)
        first = time.perf_counter()
        last = list(stream)[-1]
        assert last.completion_tokens == n, last
        return first - start, time.perf_counter() - first

    def theirs_run(ids, n):
        theirs.reset()
        start = time.perf_counter()
        stream = theirs.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        next(stream)
        first = time.perf_counter()
        for _ in range(n - 1):
            next(stream)
        end = time.perf_counter()
        stream.close()
        return first - start, end - first

    best = {k: float("inf") for k in ("od", "td", "op", "tp")}
    for _ in range(ROUNDS):  # interleaved, so a noisy neighbour hurts both sides alike
        best["od"] = min(best["od"], ours_run(decode_ids, N_DECODE)[1])
        best["td"] = min(best["td"], theirs_run(decode_ids, N_DECODE)[1])
        best["op"] = min(best["op"], ours_run(prefill_ids, 1)[0])
        best["tp"] = min(best["tp"], theirs_run(prefill_ids, 1)[0])
    # N tokens are sampled, N-1 decoded after the first: rate over the decoded ones.
    row(f"decode tok/s ({N_DECODE} tokens)", (N_DECODE - 1) / best["od"], (N_DECODE - 1) / best["td"], "tok/s")
    row(f"prefill tok/s ({len(prefill_ids)} tokens)", len(prefill_ids) / best["op"], len(prefill_ids) / best["tp"], "tok/s")
    ours.close()
    theirs.close()


COLD_OURS = """
import time, localgemma
t = time.perf_counter()
next(iter(localgemma.run(model={path!r}, inputs={{"prompt": "Hi", "raw": True, "stream": True, "max_tokens": 1}})))
"""
COLD_THEIRS = """
import llama_cpp
llm = llama_cpp.Llama({path!r}, n_ctx=8192, n_threads={threads}, verbose=False)
next(iter(llm.create_completion("Hi", max_tokens=1, stream=True)))
"""


def cold_start(path: str, threads: int) -> None:
    def timed(argv: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    def python(code: str) -> list[str]:
        return [sys.executable, "-c", code.format(path=path, threads=threads)]

    command = [os.path.join(os.path.dirname(sys.executable), "localgemma"), "run", "--model", path,
               "--max-tokens", "1", "--raw", "--stream", "Hi"]
    best = {"api": float("inf"), "cli": float("inf"), "theirs": float("inf")}
    for _ in range(ROUNDS):  # interleaved, as above
        best["api"] = min(best["api"], timed(python(COLD_OURS)))
        best["cli"] = min(best["cli"], timed(command))
        best["theirs"] = min(best["theirs"], timed(python(COLD_THEIRS)))
    row("cold start -> first token (s)", best["api"], best["theirs"], "s", higher_is_better=False)
    row("  the same, `localgemma run`", best["cli"], best["theirs"], "s", higher_is_better=False)


def setup(ours: str, theirs: str) -> tuple[str, int]:
    """The embedded GGUF and the thread count every section uses, and the table header."""
    from localgemma import system
    from localgemma.models import resolve

    path = str(resolve(None))
    threads = int(os.environ.get("LOCALGEMMA_THREADS", 0)) or system.physical_cores()
    print(f"model {os.path.basename(path)}, {threads} threads, best of {ROUNDS} rounds")
    print(f"{'metric':34} {ours:>10} {theirs:>18} {'unit':6} {'ratio':>7}")
    return path, threads


def main() -> None:
    path, threads = setup("localgemma", "llama-cpp-python")
    runtime_bench(path, threads)
    cold_start(path, threads)
    print("-- LoRA (ratio: adapter or merged over base)")
    from bench_lora import lora_bench

    lora_bench(path, threads, ROUNDS)
    print("-- HTTP server (ratio: in-process over HTTP for TTFT, HTTP over in-process for tok/s)")
    from bench_server import server_bench

    server_bench(path, threads)
    print("-- KV cache types (ratio: type over f16; KV MiB: f16 over type)")
    from bench_kv import kv_bench

    kv_bench(path, threads)


if __name__ == "__main__":
    main()
