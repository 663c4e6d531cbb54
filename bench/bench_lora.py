"""LoRA rows for `make bench`: registering a PEFT adapter (`localgemma convert lora` and
`localgemma finetune create`, each a fresh process: wall time and peak RSS), adapter load and
switch time, and decode speed with a rank-8 adapter on all seven projections against the bare
base and against the adapter merged in.

Targets: convert / create of the ~7.5 MB adapter <= 1 s and <= 150 MB; switch <= 5 ms;
adapter decode >= 0.85x base; merged decode >= 0.97x base.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
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


# Runs one command as its only child: its wall time (process start included) and peak RSS.
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
if done.returncode:
    sys.exit(done.stderr.decode()[-2000:])
print(json.dumps([wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))
"""


def _measure(command: list[str], env: dict) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of `command` in a process of its own."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *command], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {out.stderr.strip()}")
    wall, rss = json.loads(out.stdout)
    return wall, rss


def registration_rows(path: str, peft: Path, tmp: Path, rounds: int) -> None:
    """`convert lora` and `finetune create` of `peft` on the base `path`, as a user runs them."""
    from servers import home_with_model

    from localgemma.models import EMBEDDED_ID

    cli = Path(sys.executable).with_name("localgemma")
    cli_cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "localgemma"]
    home = home_with_model(tmp / "home", Path(path).resolve())
    env = {**os.environ, "LOCALGEMMA_HOME": str(home)}
    size_mb = sum(f.stat().st_size for f in peft.iterdir()) / 2**20
    runs = {"convert": [], "create": []}
    for i in range(rounds):
        runs["convert"].append(_measure([*cli_cmd, "convert", "lora", str(peft), "--base", path,
                                         "-o", str(tmp / f"convert{i}.gguf")], env))
        runs["create"].append(_measure([*cli_cmd, "finetune", "create", EMBEDDED_ID, f"bench-{i}", str(peft)], env))
    for name, label in (("convert", "convert lora"), ("create", "finetune create")):
        wall, rss = min(w for w, _ in runs[name]), max(r for _, r in runs[name])
        print(f"{f'{label} ({size_mb:.1f} MB): wall':34} {wall:10.2f} {'':>18} s      target <= 1")
        print(f"{f'{label}: peak RSS':34} {rss:10.1f} {'':>18} MiB    target <= 150")


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
        registration_rows(path, tmp / "peft1", tmp, rounds)

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
