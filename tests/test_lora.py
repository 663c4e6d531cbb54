"""Finetune registry and per-request adapters on the real embedded model."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import localgemma
from localgemma import finetunes
from localgemma.adapters import AdapterCache
from localgemma.engine import Engine
from localgemma.errors import AdapterMismatch, ConversionError, InvalidInput
from localgemma.generation import AdapterRef, GenerationRequest
from localgemma.sampling import SamplingParams
from peft_util import make_peft_adapter
from servers import home_with_model

pytestmark = pytest.mark.e2e

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = dict(prompt="The capital of France is", raw=True, temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def home(tmp_path_factory, embedded_gguf):
    """One registry for the module, beside the session's embedded model."""
    home = tmp_path_factory.mktemp("lora-home")
    old = os.environ["LOCALGEMMA_HOME"]
    home_with_model(home, embedded_gguf)
    os.environ["LOCALGEMMA_HOME"] = str(home)
    yield home
    os.environ["LOCALGEMMA_HOME"] = old


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory, embedded_gguf):
    root = tmp_path_factory.mktemp("peft")
    return {name: make_peft_adapter(root / name, embedded_gguf, targets=ALL, seed=seed)
            for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def registered(home, peft_dirs):
    return {name: finetunes.create(None, f"style-{name}", path, f"adapter {name}") for name, path in peft_dirs.items()}


def answer(**fields):
    return localgemma.run(None, {**PROMPT, **fields})["response"]


def snapshot(home: Path) -> list:
    """What a reader of the registry sees: every entry, and every visible folder."""
    visible = sorted(p.name for p in (home / "finetunes").iterdir() if not p.name.startswith(".")) \
        if (home / "finetunes").exists() else []
    return [visible, [e.to_dict() for e in finetunes.list_finetunes()]]


# -- registry ---------------------------------------------------------------------------------

def test_create_list_show(registered):
    a = registered["a"]
    assert a.status == "ready" and a.rank == 8 and a.alpha == 16 and set(a.targets) == set(ALL)
    assert len(a.id) == 36 and a.adapter_path.read_bytes()[:4] == b"GGUF"
    assert [e.name for e in finetunes.list_finetunes()] == ["style-a", "style-b"]
    assert finetunes.get("style-a") == a == finetunes.get(a.id)
    assert set(a.to_dict()) >= {"id", "name", "model", "description", "rank", "alpha", "targets", "sha256",
                                "created_at", "modified_at", "public", "adapter_path"}


def test_names_are_unique_per_model(registered, peft_dirs, home):
    before = snapshot(home)
    with pytest.raises(finetunes.FinetuneExists, match="'style-a' already exists"):
        finetunes.create(None, "style-a", peft_dirs["a"])
    assert snapshot(home) == before


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "00000000-0000-0000-0000-000000000000"])
def test_unsafe_names_refused(name, home, peft_dirs):
    before = snapshot(home)
    with pytest.raises(InvalidInput, match="^name: "):
        finetunes.create(None, name, peft_dirs["a"])
    assert snapshot(home) == before


def refusal_cases(tmp: Path, base: Path):
    """(folder, what the message must mention): each a broken adapter a user could upload."""
    cases = []
    missing = make_peft_adapter(tmp / "missing", base)
    (missing / "adapter_model.safetensors").unlink()
    cases.append((missing, "adapter_model.safetensors"))
    no_type = make_peft_adapter(tmp / "no_type", base)
    config = json.loads((no_type / "adapter_config.json").read_text())
    del config["model_type"]
    (no_type / "adapter_config.json").write_text(json.dumps(config))
    cases.append((no_type, '"model_type": "gemma"'))
    cases.append((make_peft_adapter(tmp / "dora", base, extra_config={"use_dora": True}), "DoRA"))
    cases.append((make_peft_adapter(tmp / "big", base, rank=128), "rank"))
    truncated = make_peft_adapter(tmp / "truncated", base)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((truncated, "adapter_model.safetensors"))
    return cases


def test_every_refusal_leaves_the_registry_unchanged(registered, home, tmp_path, embedded_gguf):
    before = snapshot(home)
    for folder, mention in refusal_cases(tmp_path, embedded_gguf):
        with pytest.raises(ConversionError) as info:
            finetunes.create(None, f"bad-{folder.name}", folder)
        assert mention in str(info.value), (folder.name, str(info.value))
        assert snapshot(home) == before, folder.name
    assert not [p for p in (home / "finetunes").iterdir() if p.name.startswith(".staging")]


CRASH = """
import os, sys
from localgemma import finetunes
point = sys.argv[1]
real_write, real_convert = finetunes._write_meta, finetunes._convert
def write_then_die(entry, folder):
    real_write(entry, folder)
    os._exit(9)                      # killed after everything is staged, before the rename
def convert_then_die(entry, source, folder, **kw):
    (folder / "adapter.gguf").write_bytes(b"GGUF half")
    os._exit(9)                      # killed in the middle of the conversion
finetunes._write_meta = write_then_die if point == "meta" else real_write
finetunes._convert = convert_then_die if point == "convert" else real_convert
finetunes.create(None, "crashy", sys.argv[2])
"""


@pytest.mark.parametrize("point", ["convert", "meta"])
def test_create_killed_midway_leaves_no_half_entry(point, registered, home, peft_dirs):
    before = snapshot(home)
    proc = subprocess.run([sys.executable, "-c", CRASH, point, str(peft_dirs["a"])],
                          env={**os.environ, "LOCALGEMMA_HOME": str(home)}, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    assert snapshot(home) == before
    with pytest.raises(finetunes.UnknownFinetune):
        finetunes.get("crashy")
    # ... and the next create still works, leftovers notwithstanding
    entry = finetunes.create(None, "crashy", peft_dirs["a"])
    finetunes.delete(entry.id)
    assert snapshot(home) == before


def test_pending_entry_becomes_usable_with_both_files(registered, home, peft_dirs):
    entry = finetunes.create_pending(None, "uploaded", "via REST")
    with pytest.raises(finetunes.FinetuneIncomplete, match="still needs adapter_config.json"):
        answer(lora="uploaded")
    for file_name in finetunes.REQUIRED_FILES:
        finetunes.add_asset(entry.id, file_name, (peft_dirs["a"] / file_name).read_bytes())
    assert finetunes.get("uploaded").status == "ready"
    assert answer(lora="uploaded") == answer(lora="style-a")
    finetunes.delete("uploaded")


def test_delete(registered, home, peft_dirs):
    entry = finetunes.create(None, "temporary", peft_dirs["b"])
    assert finetunes.delete("temporary").id == entry.id
    assert not entry.folder.exists()
    with pytest.raises(finetunes.UnknownFinetune, match="Finetune temporary not found"):
        finetunes.delete("temporary")


# -- runtime ----------------------------------------------------------------------------------

def test_adapter_changes_output_and_unknown_lora_is_refused(registered):
    assert answer(lora="style-a") != answer()
    assert answer(lora="style-a") != answer(lora="style-b")
    with pytest.raises(finetunes.UnknownFinetune) as info:
        answer(lora="nope")
    assert info.value.code == 3037 and "Finetune nope not found" in str(info.value)


def test_isolation_sequence_equals_each_alone(registered, embedded_gguf):
    """base -> A -> B -> A -> base on one engine gives what each gives on a fresh engine."""
    sequence = [None, "style-a", "style-b", "style-a", None]
    in_sequence = [answer(**({"lora": name} if name else {})) for name in sequence]
    alone = {}
    for name in (None, "style-a", "style-b"):
        fresh = Engine(embedded_gguf, n_ctx=512)
        ids = fresh.tokenize(PROMPT["prompt"], add_bos=True)
        refs = (AdapterRef(str(finetunes.get(name).adapter_path)),) if name else ()
        alone[name] = "".join(c.text for c in fresh.generate(
            GenerationRequest(tuple(ids), SamplingParams(temperature=0), 12, adapters=refs)))
        fresh.close()
    assert in_sequence == [alone[name] for name in sequence]


def test_several_adapters_with_scales(registered):
    mixed = answer(lora="style-a:0.5,style-b:0.5")
    assert mixed not in (answer(), answer(lora="style-a"), answer(lora="style-b"))
    assert answer(lora="style-a:1") == answer(lora="style-a")
    assert answer(lora="style-a:0") == answer()
    with pytest.raises(InvalidInput, match="lora: 'style-a:lots' has scale 'lots'"):
        answer(lora="style-a:lots")


def test_adapter_for_another_model_is_refused(registered):
    with pytest.raises(InvalidInput, match="was made for @localgemma/google/gemma-3-270m, not @cf/google/gemma-2b-it-lora"):
        localgemma.run("@cf/google/gemma-2b-it-lora", {**PROMPT, "lora": registered["a"].id})


def test_adapter_with_foreign_shapes_is_a_clear_error(tmp_path, embedded_gguf):
    import numpy as np
    from peft_util import write_gguf_adapter

    bad = write_gguf_adapter(tmp_path / "foreign.gguf", {  # 2B-sized, not 270M
        "blk.0.attn_q.weight": (np.zeros((8, 2048)), np.zeros((2048, 8)))})
    engine = localgemma.runtime.get_engine(None)
    with pytest.raises(AdapterMismatch, match="made for another base"):
        list(engine.generate(GenerationRequest((2, 651), SamplingParams(temperature=0), 2,
                                               adapters=(AdapterRef(str(bad)),))))
    assert answer() == answer()  # the engine is unharmed


def test_adapters_in_concurrent_use(registered):
    names = [None, "style-a", "style-b"] * 3
    solo = {name: answer(**({"lora": name} if name else {})) for name in set(names)}
    results = [None] * len(names)

    def worker(i, name):
        results[i] = answer(**({"lora": name} if name else {}))

    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [solo[name] for name in names]


def test_adapter_cache_loads_once_and_respects_its_budget(registered):
    engine = localgemma.runtime.get_engine(None)
    loads = engine.adapters.loads
    for _ in range(3):
        answer(lora="style-a")
    assert engine.adapters.loads <= loads + 1
    tiny = AdapterCache(engine._model, budget=1)  # room for one adapter at a time
    paths = [str(registered[n].adapter_path) for n in ("a", "b", "a")]
    for path in paths:
        tiny.handle(path)
    assert tiny.loads == 3 and len(tiny._loaded) == 1
    tiny.close()


# -- verify and the CLI -----------------------------------------------------------------------

def test_verify_agrees_with_the_numpy_merge(registered):
    from localgemma.verify import verify

    report = verify("style-a")
    a, floor, base = report.adapter_vs_merged, report.noise_floor, report.base_vs_merged
    # Measured on the embedded Q4_K_M: runtime vs merged KL ~0.026 (floor ~0.009), base ~2.1.
    assert report.ok
    assert a.kl_mean < 0.05 and a.top1 >= 0.75
    assert base.kl_mean > 1.0 and base.top1 < 0.6
    assert floor.kl_mean < a.kl_mean * 1.5 + 0.01


def test_verify_against_peft_itself(registered):
    """Only where the `verify` extra (torch, transformers, peft) is installed."""
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module)
    from localgemma.verify import verify

    report = verify("style-b")
    # Measured: runtime vs PEFT KL ~0.026, llama.cpp vs torch without adapter ~0.009.
    assert report.peft.startswith("compared against PEFT")
    assert report.adapter_vs_peft.kl_mean < 0.05 and report.adapter_vs_peft.top1 >= 0.75
    assert report.peft_noise_floor.kl_mean < 0.02 and report.ok


def test_verify_catches_an_adapter_that_does_not_match_its_source(registered, peft_dirs):
    from localgemma.verify import verify

    entry = finetunes.create(None, "tampered", peft_dirs["a"])
    try:
        entry.adapter_path.write_bytes(registered["b"].adapter_path.read_bytes())
        report = verify("tampered")
        assert not report.ok and report.adapter_vs_merged.kl_mean > 1.0
    finally:
        finetunes.delete("tampered")


def test_finetune_cli(registered, peft_dirs, home):
    from click.testing import CliRunner

    from localgemma.cli import main

    cli = CliRunner()
    created = cli.invoke(main, ["finetune", "create", "@localgemma/google/gemma-3-270m", "via-cli", str(peft_dirs["b"]),
                                "--description", "from the CLI"])
    assert created.exit_code == 0, created.output
    new_id = created.output.strip()
    listing = json.loads(cli.invoke(main, ["finetune", "list", "--json"]).output)
    assert {"id": new_id, "name": "via-cli", "description": "from the CLI"}.items() <= \
        next(e for e in listing if e["id"] == new_id).items()
    shown = json.loads(cli.invoke(main, ["finetune", "show", "via-cli", "--json"]).output)
    assert Path(shown["adapter_path"]).is_file() and shown["rank"] == 8
    used = cli.invoke(main, ["run", "The capital of France is", "--raw", "--temperature", "0", "--max-tokens", "12",
                             "--lora", "via-cli"])
    assert used.output.strip() == answer(lora="style-b").strip()
    again = cli.invoke(main, ["finetune", "create", "@localgemma/google/gemma-3-270m", "via-cli", str(peft_dirs["b"])])
    assert again.exit_code == 1 and again.output.startswith("Error: name: a finetune named 'via-cli' already exists")
    # --exist-ok: the same files again give the same id (make run registers its example this way)
    same = cli.invoke(main, ["finetune", "create", "@localgemma/google/gemma-3-270m", "via-cli", str(peft_dirs["b"]),
                             "--exist-ok"])
    assert same.exit_code == 0 and same.output.strip() == new_id, same.output
    before = snapshot(home)
    other = cli.invoke(main, ["finetune", "create", "@localgemma/google/gemma-3-270m", "via-cli", str(peft_dirs["a"]),
                              "--exist-ok"])
    assert other.exit_code == 1 and "from other files than those in" in other.output and new_id in other.output
    assert snapshot(home) == before
    assert cli.invoke(main, ["finetune", "delete", new_id]).output == f"deleted via-cli ({new_id})\n"
    missing = cli.invoke(main, ["finetune", "show", "via-cli"])
    assert missing.exit_code == 1 and "Finetune via-cli not found" in missing.output
