"""Will it fit: memory estimated from the header, refusals that name what would fit, and the
context default shrinking to what fits -- all before llama.cpp loads anything (these tests
load no model: tests/conftest.py would fail them if one were loaded)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from localgemma import memory, models, system
from localgemma.errors import InsufficientMemory
from localgemma.models import CATALOG, EMBEDDED_ID
from localgemma.runtime import Runtime
from localgemma.settings import current

MiB = memory.MiB
TWO_B, SEVEN_B = "@cf/google/gemma-2b-it-lora", "@cf/google/gemma-7b-it-lora"


GEMMA_270M = CATALOG[EMBEDDED_ID].shape


@pytest.fixture(autouse=True)
def _default_runtime_restored():
    """`run --n-ctx/--kv-type` configure this process's default runtime: undo it after each test."""
    from localgemma import runtime

    before = runtime._default
    yield
    if runtime._default is not before:
        runtime._default.close()
        runtime._default = before
NAME = "gemma-3-270m-q4_k_m.gguf"


@pytest.mark.e2e
def test_the_header_gives_the_shape_the_catalog_has(embedded_gguf):
    assert memory.shape_of(embedded_gguf) == GEMMA_270M


def test_estimates_match_what_was_measured():
    """Peak resident memory of the embedded model with a prompt that fills the context, and of
    a server at its defaults with both of its contexts filled (module docstring)."""
    shape = GEMMA_270M
    for contexts, measured in (([memory.Context(2048)], 415), ([memory.Context(8192)], 537),
                               ([memory.Context(32768)], 1026),
                               ([memory.Context(8192), memory.batch_context(4096, 4)], 662)):
        total = memory.estimate(shape, contexts).total / MiB
        assert abs(total - measured) / measured < 0.03, (contexts, total, measured)


def test_kv_types_shrink_the_cache_as_llama_cpp_stores_them():
    shape = CATALOG[SEVEN_B].shape
    f16, q8, q4 = (memory.estimate(shape, [memory.Context(8192)], t).kv for t in ("f16", "q8_0", "q4_0"))
    assert f16 == 8192 * 28 * 16 * 512 * 2  # 3.5 GiB: cells x layers x kv heads x (k + v) x 2 bytes
    assert (q8, q4) == (pytest.approx(f16 * 34 / 64), pytest.approx(f16 * 18 / 64))


def test_cells_are_padded_like_llama_cpp():
    shape = CATALOG[TWO_B].shape
    assert memory.estimate(shape, [memory.Context(1000)]).kv == memory.estimate(shape, [memory.Context(1024)]).kv


def fit(**kw):
    return memory.fit(NAME, shape=GEMMA_270M, **kw)


def test_a_default_that_fits_is_kept():
    assert fit(n_ctx=None, default_ctx=8192, available=4096 * MiB) == (8192, None)
    assert fit(n_ctx=None, default_ctx=None, available=4096 * MiB) == (8192, None)  # trained on 32768: capped


def test_a_default_that_does_not_fit_becomes_the_largest_that_does():
    n_ctx, note = fit(n_ctx=None, default_ctx=8192, available=450 * MiB)
    shape = GEMMA_270M
    assert n_ctx % 256 == 0 and memory.estimate(shape, [memory.Context(n_ctx)]).total <= 450 * MiB
    assert memory.estimate(shape, [memory.Context(n_ctx + 256)]).total > 450 * MiB
    assert f"using {n_ctx} tokens" in note and "450 MiB is available" in note and "--n-ctx" in note


def test_an_explicit_context_that_does_not_fit_is_refused_with_what_would():
    with pytest.raises(InsufficientMemory) as refused:
        fit(n_ctx=8192, default_ctx=8192, available=480 * MiB)
    message = refused.value.message
    assert "with a context of 8192 tokens needs 542 MiB (235 weights + 144 KV cache for 8192 tokens in f16" in message
    assert "only 480 MiB" in message and "what would fit: a context of 4864 tokens (--n-ctx 4864)" in message
    assert "--kv-type q8_0 (the 8192 tokens fit); or --kv-type q4_0 (the 8192 tokens fit)" in message
    with pytest.raises(InsufficientMemory) as tighter:  # q8_0 (475 MiB) no longer fits; q4_0 (439) does
        fit(n_ctx=8192, default_ctx=8192, available=460 * MiB)
    assert "q8_0" not in tighter.value.message and "--kv-type q4_0" in tighter.value.message


def test_when_nothing_fits_it_says_so():
    with pytest.raises(InsufficientMemory, match="nothing would: even its weights and a context of 256 tokens"):
        fit(n_ctx=None, default_ctx=8192, available=200 * MiB)


def test_a_7b_on_an_8_gb_pi():
    """MemAvailable on an 8 GB Pi is about 7.4 GiB: the 7B at 8192 tokens in f16 is 8.8 GiB."""
    shape = CATALOG[SEVEN_B].shape
    need = memory.estimate(shape, [memory.Context(8192)])
    assert 8.5 * 2**30 < need.total < 9.2 * 2**30
    assert memory.estimate(shape, [memory.Context(8192)], "q8_0").total < 7.4 * 2**30
    assert 3000 < memory.largest_context(shape, int(7.4 * 2**30), "f16") < 6000


@pytest.fixture
def tiny_memory(monkeypatch, fake_gguf):
    """40 MiB less than the fake 270M (F32 weights: about 1.3 GiB) needs at 8192 tokens."""
    need = memory.estimate(memory.shape_of(fake_gguf), [memory.Context(8192)]).total
    monkeypatch.setattr(system, "available_memory", lambda: need - 40 * MiB)
    return need - 40 * MiB


@pytest.fixture
def bound(fake_gguf):
    models.bind(TWO_B, fake_gguf, persist=False)
    yield
    models.unbind(TWO_B)


def test_a_batch_context_counts_its_cached_sequences():
    """The prefix cache keeps as many finished sequences as run, each with a logits row of its
    own in llama.cpp, within its 256 sequence ids."""
    assert memory.batch_context(4096, 4) == memory.Context(4096, 8)
    assert memory.batch_context(4096, 128).n_seq == 256 and memory.batch_context(4096, 200).n_seq == 256
    per_row = GEMMA_270M.n_vocab * 4
    assert (memory.estimate(GEMMA_270M, [memory.batch_context(4096, 4)]).compute
            - memory.estimate(GEMMA_270M, [memory.Context(4096, 4)]).compute) == 4 * per_row


def test_the_runtime_refuses_before_loading(bound, tiny_memory):
    runtime = Runtime(current(n_ctx=8192), exact=True)
    with pytest.raises(InsufficientMemory, match="what would fit"):
        runtime.engine(TWO_B)  # a load would fail the test (conftest): the refusal comes first


def test_a_server_counts_its_batch_context(bound, monkeypatch, fake_gguf):
    alone = memory.estimate(memory.shape_of(fake_gguf), [memory.Context(8192)]).total
    monkeypatch.setattr(system, "available_memory", lambda: alone + 30 * MiB)
    assert Runtime(current(), exact=True).plan(TWO_B) == (8192, None)
    n_served, note = Runtime(current(batch_ctx=2048, parallel=4), exact=False).plan(TWO_B)
    assert 256 <= n_served < 8192 and f"using {n_served} tokens" in note
    assert "beside a batch context of 2048 tokens" in note and "more fits with --kv-type q8_0 or a smaller --batch-ctx" \
        in note
    monkeypatch.setattr(system, "available_memory", lambda: alone + 100 * MiB)
    with pytest.raises(InsufficientMemory) as refused:
        Runtime(current(n_ctx=8192, batch_ctx=16384), exact=False).plan(TWO_B)
    message = refused.value.message
    assert "with a context of 8192 tokens beside a batch context of 16384 tokens needs" in message
    assert "no batch context (--exact: one request at a time; the 8192 tokens fit)" in message
    cells = int(message.split("--batch-ctx ")[1].split(")")[0])
    assert Runtime(current(n_ctx=8192, batch_ctx=cells), exact=False).plan(TWO_B) == (8192, None)  # it fits
    with pytest.raises(InsufficientMemory):
        Runtime(current(n_ctx=8192, batch_ctx=cells + 256), exact=False).plan(TWO_B)  # and is the largest


def test_every_way_out_a_refusal_offers_fits():
    """Each option named is checked, alone, against the same memory; none is offered that
    does not fit, and none at all is 'nothing would'."""
    batch = memory.batch_context(4096, 4)
    for available in range(380, 660, 20):
        try:
            fit(n_ctx=8192, default_ctx=8192, batch=batch, available=available * MiB)
            continue
        except InsufficientMemory as refused:
            message = refused.message
        if "nothing would" in message:
            assert "what would fit" not in message
            continue
        for option in message.split("what would fit: ")[1].split("; or "):
            n_ctx, contexts, kv = 8192, [batch], "f16"
            if "--n-ctx" in option:
                n_ctx = int(option.split("--n-ctx ")[1].rstrip(")"))
            elif "--batch-ctx" in option:
                contexts = [memory.Context(int(option.split("--batch-ctx ")[1].rstrip(")")), batch.n_seq)]
            elif "--exact" in option:
                contexts = []
            else:
                kv = option.split("--kv-type ")[1].split()[0]
            need = memory.estimate(GEMMA_270M, [memory.Context(n_ctx), *contexts], kv).total
            assert need <= available * MiB, (available, option)


def test_the_shrink_note_offers_only_a_kv_type_that_holds_more():
    _, note = fit(n_ctx=None, default_ctx=8192, available=420 * MiB)
    assert "(--n-ctx / LOCALGEMMA_N_CTX sets it; more fits with --kv-type q8_0)" in note
    _, note = fit(n_ctx=None, default_ctx=8192, kv_type="q8_0", available=420 * MiB)
    assert "more fits with --kv-type q4_0" in note
    _, note = fit(n_ctx=None, default_ctx=8192, kv_type="q4_0", available=400 * MiB)
    assert "--kv-type" not in note and "(--n-ctx / LOCALGEMMA_N_CTX sets it)" in note


def test_a_default_server_that_fits_nowhere_offers_what_would_and_each_does():
    """serve with no --n-ctx, where not even 256 tokens fit beside the batch context: the
    refusal offers --exact, a smaller batch context and smaller KV types -- each followed
    here, each fitting (it said 'nothing would')."""
    batch = memory.batch_context(4096, 4)
    for available in (420, 450, 500):
        with pytest.raises(InsufficientMemory) as refused:
            fit(n_ctx=None, default_ctx=8192, batch=batch, available=available * MiB)
        message = refused.value.message
        assert "what would fit" in message and "--exact" in message, message
        assert ("--batch-ctx" in message) == (available > 420), message  # at 420 the weights and two steps fill it
        for option in message.split("what would fit: ")[1].split("; or "):
            kw = {"n_ctx": None, "default_ctx": 8192, "batch": batch, "available": available * MiB}
            if "--batch-ctx" in option:
                kw["batch"] = memory.Context(int(option.split("--batch-ctx ")[1].split(")")[0]), batch.n_seq)
            elif "--exact" in option:
                kw["batch"] = None
            elif "--kv-type" in option:
                kw["kv_type"] = option.split("--kv-type ")[1].split()[0]
            n_ctx, _ = fit(**kw)  # raises if it does not fit
            if "--batch-ctx" in option:
                assert n_ctx >= kw["batch"].n_ctx  # the context is not shrunk below the batch context


def test_a_context_longer_than_the_model_was_trained_on_is_refused_and_never_offered():
    from localgemma.errors import InvalidInput

    with pytest.raises(InvalidInput, match="--n-ctx / LOCALGEMMA_N_CTX: 65536 is more than the 32768 tokens "
                                           "gemma-3-270m-q4_k_m.gguf was trained on.*use 32768 or less"):
        fit(n_ctx=65536, default_ctx=8192, available=64 * 2**30)
    assert fit(n_ctx=32768, default_ctx=8192, available=64 * 2**30) == (32768, None)
    assert memory.largest_context(GEMMA_270M, 64 * 2**30, "f16") == 32768  # what fits past it is not offered


def test_the_cli_refuses_in_one_line(bound, tiny_memory):
    from localgemma.cli import main

    result = CliRunner().invoke(main, ["run", "hi", "--model", TWO_B, "--n-ctx", "8192"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "--kv-type q8_0" in result.output and "Traceback" not in result.output


def test_serve_refuses_at_start_not_at_the_first_request(tiny_memory, fake_gguf):
    from localgemma.server.cli import serve

    try:
        result = CliRunner().invoke(serve, ["--model", f"{TWO_B}={fake_gguf}", "--n-ctx", "8192"])
    finally:
        models.unbind(TWO_B)  # --model binds for the process
    assert result.exit_code == 1 and result.output.startswith("Error: ")  # as run says it: not a usage error
    assert f"only {tiny_memory / MiB:,.0f} MiB of memory is available" in result.output


def test_info_shows_each_models_needs(monkeypatch):
    from localgemma.cli import main

    monkeypatch.setattr(system, "available_memory", lambda: int(7.4 * 2**30))
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    import json

    estimates = json.loads(result.output)["memory"]
    assert set(estimates) == set(CATALOG)
    seven = estimates[SEVEN_B]
    assert seven["fits_run"] is False and seven["run"]["kv_mib"] == 3584 and 3000 < seven["largest_context_that_fits"]
    assert seven["largest_context_that_fits_serve"] < seven["largest_context_that_fits"]
    assert seven["n_ctx_train"] == 8192
    text = CliRunner().invoke(main, ["info"], env={"LOCALGEMMA_N_CTX": "16384"}).output
    assert "memory needed at these settings (LOCALGEMMA_N_CTX=16384;" in text
    assert "largest context that fits: run " in text and "serve " in text
    assert "more than the 8192 tokens it was trained on (refused)" in text
    assert estimates[EMBEDDED_ID]["fits_serve"] is True


@pytest.mark.parametrize("value", ["q5_1", "F16", ""])
def test_a_kv_type_llama_cpp_does_not_have_is_refused(value):
    from localgemma.cli import main

    result = CliRunner().invoke(main, ["run", "hi", "--kv-type", value])
    assert result.exit_code == 2 and "'f16', 'q8_0', 'q4_0'" in result.output


@pytest.mark.e2e
def test_a_quantized_kv_cache_is_used_and_stays_close(embedded_gguf):
    """q8_0 changes the logits (so the cache type really applies) but only a little."""
    import numpy as np

    from localgemma.engine import Engine

    text = "The old mill stands at the second bend of the river. It was built in 1794 and burned in 1861. " * 4
    rows = {}
    for kv_type in ("f16", "q8_0"):
        engine = Engine(embedded_gguf, n_ctx=512, n_threads=1, kv_type=kv_type)
        try:
            ids = engine.tokenize(text, add_bos=True)
            rows[kv_type] = engine.logits(ids).astype(np.float64)
        finally:
            engine.close()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref, q8 = log_softmax(rows["f16"]), log_softmax(rows["q8_0"])
    kl = (np.exp(ref) * (ref - q8)).sum(-1)
    assert not np.array_equal(rows["f16"], rows["q8_0"])
    assert kl.mean() < 0.02 and (ref.argmax(-1) == q8.argmax(-1)).mean() > 0.95


@pytest.mark.e2e
def test_the_cli_runs_with_a_q4_0_cache(embedded_gguf):
    from localgemma import runtime
    from localgemma.cli import main

    result = CliRunner().invoke(main, ["run", "The capital of France is", "--raw", "--temperature", "0",
                                       "--max-tokens", "6", "--kv-type", "q4_0", "--n-ctx", "512"])
    assert result.exit_code == 0 and result.output.strip(), result.output
    engine = runtime._default.engine(None)
    assert (engine.kv_type, engine.n_ctx) == ("q4_0", 512)


def _cgroup(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_a_containers_memory_limit_is_what_is_available(tmp_path):
    """docker run --memory 1g: the kernel kills the process at the cgroup's limit however much
    the machine has, so the limit less what the cgroup uses (its reclaimable page cache not
    counted) is what a model may take; the tightest of the cgroup and its ancestors."""
    membership = tmp_path / "cgroup"
    membership.write_text("0::/app/worker\n")
    root = tmp_path / "sys"
    _cgroup(root / "app", {"memory.max": str(1024 * MiB), "memory.current": str(300 * MiB),
                           "memory.stat": f"anon 1\ninactive_file {100 * MiB}\n"})
    _cgroup(root / "app" / "worker", {"memory.max": "max", "memory.current": str(200 * MiB), "memory.stat": ""})
    assert system.cgroup_room(root, membership) == (1024 - 200) * MiB
    (root / "app" / "worker" / "memory.max").write_text(str(512 * MiB))
    assert system.cgroup_room(root, membership) == (512 - 200) * MiB
    membership.write_text("0::/elsewhere/on/the/host\n")  # inside a namespace: the root is the container's
    _cgroup(root, {"memory.max": str(2048 * MiB), "memory.current": str(48 * MiB), "memory.stat": ""})
    assert system.cgroup_room(root, membership) == 2000 * MiB
    # cgroup v1: "unlimited" is written as a number near 2**63
    membership.write_text("4:memory:/box\n0::/\n")
    _cgroup(root / "memory" / "box", {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "1",
                                      "memory.stat": ""})
    (root / "memory.max").write_text("max")
    assert system.cgroup_room(root, membership) is None
    (root / "memory" / "box" / "memory.limit_in_bytes").write_text(str(768 * MiB))
    (root / "memory" / "box" / "memory.usage_in_bytes").write_text(str(268 * MiB))
    (root / "memory" / "box" / "memory.stat").write_text(f"cache 9\ntotal_inactive_file {68 * MiB}\n")
    assert system.cgroup_room(root, membership) == 568 * MiB
    assert system.cgroup_room(root, tmp_path / "no-such-file") is None


def test_available_memory_is_the_tighter_of_the_machine_and_the_cgroup(monkeypatch):
    monkeypatch.setattr(system, "_machine_available", lambda: 8000 * MiB)
    monkeypatch.setattr(system, "cgroup_room", lambda: 1000 * MiB)
    assert system.available_memory() == 1000 * MiB
    monkeypatch.setattr(system, "cgroup_room", lambda: None)
    assert system.available_memory() == 8000 * MiB
