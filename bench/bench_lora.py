"""LoRA rows for `make bench`: adapter load and switch time, and decode speed with a rank-8
adapter on all seven projections against the bare base and against the adapter merged in.

Targets: switch <= 5 ms; adapter decode >= 0.85x base; merged decode >= 0.97x base.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_DECODE = 128


def decode_rate(engine, ids, adapters=()) -> float:
    from localgemma.generation import GenerationRequest
    from localgemma.sampling import SamplingParams

    stream = engine.generate(GenerationRequest(tuple(ids), SamplingParams(temperature=0), N_DECODE, adapters=adapters))
    next(stream)
    start = time.perf_counter()
    last = list(stream)[-1]
    assert last.completion_tokens == N_DECODE, last
    return (N_DECODE - 1) / (time.perf_counter() - start)


def lora_bench(path: str, threads: int, rounds: int = 3) -> None:
    import llama_cpp

    from bench import row
    from localgemma.generation import AdapterRef
    from localgemma.convert import merge, peft_to_gguf
    from localgemma.engine import Engine
    from peft_util import make_peft_adapter

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ggufs = []
        for seed in (1, 2):
            peft = make_peft_adapter(tmp / f"peft{seed}", path, targets=ALL, rank=8, seed=seed)
            ggufs.append(str(peft_to_gguf(peft, path, tmp / f"adapter{seed}.gguf").out_path))
        merged = merge(path, [(ggufs[0], 1.0)], tmp / "merged.gguf").out_path

        engine = Engine(path, n_ctx=1024, n_threads=threads)
        loads = []
        for _ in range(5):
            start = time.perf_counter()
            handle = llama_cpp.llama_adapter_lora_init(engine._model, ggufs[0].encode())
            loads.append((time.perf_counter() - start) * 1e3)
            llama_cpp.llama_adapter_lora_free(handle)
        a, b = (AdapterRef(g) for g in ggufs)
        engine.adapters.activate(engine._ctx, (a,))
        engine.adapters.activate(engine._ctx, (b,))  # both loaded: what remains is the switch
        switches = []
        for i in range(50):
            start = time.perf_counter()
            engine.adapters.activate(engine._ctx, ((a,), (b,), ())[i % 3])
            switches.append((time.perf_counter() - start) * 1e3)

        merged_engine = Engine(merged, n_ctx=1024, n_threads=threads)
        ids = engine.tokenize("la la la la la la la la", add_bos=True)
        best = {"base": 0.0, "adapter": 0.0, "merged": 0.0}
        for _ in range(rounds):  # interleaved: noise hits all three alike
            best["base"] = max(best["base"], decode_rate(engine, ids))
            best["adapter"] = max(best["adapter"], decode_rate(engine, ids, (a,)))
            best["merged"] = max(best["merged"], decode_rate(merged_engine, ids))
        size_mb = Path(ggufs[0]).stat().st_size / 2**20
        print(f"{'adapter load (%.1f MB GGUF)' % size_mb:34} {statistics.median(loads):10.2f} {'':>18} ms")
        print(f"{'adapter switch (median of 50)':34} {statistics.median(switches):10.3f} {'':>18} ms     target <= 5")
        row("decode tok/s: rank-8 adapter/base", best["adapter"], best["base"], "tok/s")
        row("decode tok/s: merged/base", best["merged"], best["base"], "tok/s")
        merged_engine.close()
        engine.close()
