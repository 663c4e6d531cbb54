"""localgemma.convert: PEFT LoRA -> GGUF, merge, quantize, and the `convert` CLI.

Fast tests check files (metadata, names, shapes, scales, refusals) against a stand-in base
with the embedded model's header (tests/fake_base.py); tests marked e2e load the real embedded
Gemma 3 270M in llama.cpp and compare last-token logits for a fixed prompt.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from localgemma.convert import QUANT_TYPES, merge, peft_to_gguf, quantize
from localgemma.convert.cli import _parse_adapter, convert
from localgemma.convert.gguf_lora import open_gguf
from localgemma.convert.safetensors_io import read_safetensors
from localgemma.errors import ConversionError
from fake_base import write_fake_base
from peft_util import make_peft_adapter, peft_scale, to_bf16_bits, write_safetensors

GGUF_KIND = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
PROMPT = b"The capital of France is"


def adapter_tensors(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def peft_module(key: str) -> tuple[str, int, str]:
    """"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" -> (module path, 3, "q_proj")."""
    module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
    return module, int(re.search(r"layers\.(\d+)\.", module)[1]), module.rsplit(".", 1)[1]


def no_output(out: Path) -> bool:
    """Nothing at `out`, and no partial file left beside it."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The embedded model's header over sparse zero weights: what conversion reads, instantly."""
    return write_fake_base(tmp_path_factory.mktemp("fake-base") / "gemma-3-270m-like.gguf")


@pytest.fixture(scope="module")
def real_base(embedded_gguf) -> Path:
    return embedded_gguf


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def qv_adapter(base, work) -> Path:
    """A PEFT folder: rank 8, alpha 16, q_proj + v_proj on every layer, float32."""
    return make_peft_adapter(work / "qv", base)


@pytest.fixture(scope="module")
def qv_gguf(qv_adapter, base, work):
    return peft_to_gguf(qv_adapter, base, work / "qv.gguf")


# --- conversion: metadata, names, shapes ---------------------------------------------------


def test_conversion_writes_llama_cpp_adapter_metadata_and_shapes(qv_gguf, qv_adapter, base):
    fields, tensors = adapter_tensors(qv_gguf.out_path)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    assert fields["general.architecture"] == "gemma3" == qv_gguf.architecture
    assert (qv_gguf.rank, qv_gguf.alpha, qv_gguf.targets) == (8, 16.0, ("q_proj", "v_proj"))
    assert qv_gguf.layers == tuple(range(18)) and qv_gguf.n_tensors == len(tensors) == 18 * 2 * 2
    # numpy shapes: lora_a [r, n_in], lora_b [n_out, r]; Gemma 3 270M: q 1024x640, v 256x640
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (8, 640)
    assert tensors["blk.0.attn_q.weight.lora_b"].shape == (1024, 8)
    assert tensors["blk.17.attn_v.weight.lora_b"].shape == (256, 8)
    # one alpha for all modules: nothing folded, lora_b is PEFT's lora_B bit for bit
    st = load_file(qv_adapter / "adapter_model.safetensors")
    np.testing.assert_array_equal(tensors["blk.3.attn_v.weight.lora_b"],
                                  st["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"])
    import hashlib
    assert qv_gguf.sha256 == hashlib.sha256(qv_gguf.out_path.read_bytes()).hexdigest()


def test_all_seven_targets_on_a_layer_subset(base, tmp_path):
    folder = make_peft_adapter(tmp_path / "a", base, targets=tuple(GGUF_KIND), rank=4, layers=[1, 5])
    info = peft_to_gguf(folder, base, tmp_path / "a.gguf")
    _, tensors = adapter_tensors(info.out_path)
    assert info.layers == (1, 5) and info.targets == tuple(sorted(GGUF_KIND))
    assert {name.split(".")[1] for name in tensors} == {"1", "5"}
    dims = {"attn_q": (1024, 640), "attn_k": (256, 640), "attn_v": (256, 640), "attn_output": (640, 1024),
            "ffn_gate": (2048, 640), "ffn_up": (2048, 640), "ffn_down": (640, 2048)}
    for kind, (n_out, n_in) in dims.items():
        assert tensors[f"blk.5.{kind}.weight.lora_a"].shape == (4, n_in)
        assert tensors[f"blk.5.{kind}.weight.lora_b"].shape == (n_out, 4)
    assert info.n_tensors == 2 * 7 * 2


@pytest.mark.parametrize("patterns", [
    dict(rank_pattern={"v_proj": 4}, alpha_pattern={"layers.2.self_attn.q_proj": 64}),
    dict(use_rslora=True),
    dict(use_rslora=True, rank_pattern={"q_proj": 16}, alpha_pattern={"v_proj": 8}),
], ids=["rank+alpha_pattern", "rslora", "rslora+patterns"])
def test_effective_scale_equals_peft(base, tmp_path, patterns):
    """llama.cpp's (alpha / r) * lora_b @ lora_a must equal PEFT's scale_m * B @ A per module."""
    folder = make_peft_adapter(tmp_path / "a", base, layers=[0, 2, 5], **patterns)
    info = peft_to_gguf(folder, base, tmp_path / "a.gguf")
    fields, tensors = adapter_tensors(info.out_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    st = load_file(folder / "adapter_model.safetensors")
    for key in (k for k in st if ".lora_A." in k):
        module, layer, target = peft_module(key)
        a, b = st[key], st[key.replace("lora_A", "lora_B")]
        expected = peft_scale(config, module, a.shape[0]) * (b @ a)
        name = f"blk.{layer}.{GGUF_KIND[target]}.weight"
        ga, gb = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        got = (gb @ ga) * (fields["adapter.lora.alpha"] / ga.shape[0])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8, err_msg=name)


def test_float16_input_is_kept_exactly(base, tmp_path):
    folder = make_peft_adapter(tmp_path / "a", base, dtype="float16", layers=[0])
    info = peft_to_gguf(folder, base, tmp_path / "a.gguf")
    _, tensors = adapter_tensors(info.out_path)
    st = load_file(folder / "adapter_model.safetensors")  # the safetensors package reads f16
    a16 = st["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a16.dtype == np.float16
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_a"], a16.astype(np.float32))


def test_bfloat16_input_is_widened_exactly(base, tmp_path):
    bf16 = peft_to_gguf(make_peft_adapter(tmp_path / "b", base, dtype="bfloat16", layers=[0]), base, tmp_path / "b.gguf")
    f32 = make_peft_adapter(tmp_path / "f", base, dtype="float32", layers=[0])  # same seed, same values
    _, tensors = adapter_tensors(bf16.out_path)
    a32 = load_file(f32 / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    widened = (to_bf16_bits(a32).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"], widened)


def test_multimodal_gemma3_key_layout_maps_to_the_text_model(base, tmp_path):
    """Gemma3ForConditionalGeneration nests the decoder under language_model; same GGUF names."""
    folder = make_peft_adapter(tmp_path / "a", base, layers=[2])
    tensors = load_file(folder / _ST)
    nested = {k.replace("model.model.layers", "model.model.language_model.layers"): v for k, v in tensors.items()}
    write_safetensors(folder / _ST, nested)
    _, converted = adapter_tensors(peft_to_gguf(folder, base, tmp_path / "a.gguf").out_path)
    assert sorted(converted) == ["blk.2.attn_q.weight.lora_a", "blk.2.attn_q.weight.lora_b",
                                 "blk.2.attn_v.weight.lora_a", "blk.2.attn_v.weight.lora_b"]


def test_safetensors_reader_agrees_with_the_safetensors_package(tmp_path):
    values = {"x": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "y": np.array([1.5, -2.25], np.float16)}
    save_file(values, tmp_path / "ref.safetensors")
    ours = read_safetensors(tmp_path / "ref.safetensors")
    np.testing.assert_array_equal(ours.load("x"), values["x"])
    np.testing.assert_array_equal(ours.load("y"), values["y"].astype(np.float32))
    write_safetensors(tmp_path / "bf.safetensors", {"z": np.array([1.0, -2.0, 0.15625, 3e38])}, "bfloat16")
    np.testing.assert_array_equal(read_safetensors(tmp_path / "bf.safetensors").load("z")[:3], [1.0, -2.0, 0.15625])


# --- refusals: a ConversionError naming the problem, and no output file ---------------------


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


_DROP = object()
_ST = "adapter_model.safetensors"
_Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _add_tensors(folder: Path, extra: dict[str, np.ndarray]) -> None:
    tensors = load_file(folder / _ST)
    tensors.update(extra)
    write_safetensors(folder / _ST, tensors)


def _rewrite_header(folder: Path, edit) -> None:
    raw = (folder / _ST).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    (folder / _ST).write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _to_vision_tower(header: dict) -> None:
    """Every matrix renamed into the image encoder: nothing is left for text."""
    for key in [k for k in header if k != "__metadata__"]:
        header[key.replace("model.layers", "model.vision_tower.vision_model.encoder.layers")] = header.pop(key)


def _shift_offsets(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"] = [o + 4096 for o in header[last]["data_offsets"]]


REFUSALS = {
    "no config": (lambda f: (f / "adapter_config.json").unlink(), ["adapter_config.json"]),
    "no weights": (lambda f: (f / _ST).unlink(), ["no adapter_model.safetensors"]),
    "pickle weights": (lambda f: (f / _ST).rename(f / "adapter_model.bin"), ["adapter_model.bin", "safe_serialization"]),
    "misnamed weights": (lambda f: (f / _ST).rename(f / "model.safetensors"), ["model.safetensors", "must be named adapter_model.safetensors"]),
    "no model_type": (lambda f: _edit_config(f, model_type=_DROP), ['add "model_type": "gemma"']),
    "llama model_type": (lambda f: _edit_config(f, model_type="llama"), ["'llama'", '"model_type": "gemma"']),
    "not LoRA": (lambda f: _edit_config(f, peft_type="IA3"), ["'IA3'", "LORA"]),
    "DoRA config": (lambda f: _edit_config(f, use_dora=True), ["use_dora", "DoRA"]),
    "DoRA weights": (lambda f: _add_tensors(f, {f"{_Q0}.lora_magnitude_vector": np.ones(1024)}), ["DoRA", "lora_magnitude_vector"]),
    "modules_to_save": (lambda f: _edit_config(f, modules_to_save=["lm_head"]), ["modules_to_save", "lm_head"]),
    "trained bias": (lambda f: _edit_config(f, bias="all"), ["bias", "none"]),
    "embed_tokens target": (lambda f: _edit_config(f, target_modules=["q_proj", "embed_tokens"]), ["embed_tokens", "q_proj, k_proj"]),
    "embedding weights": (lambda f: _add_tensors(f, {
        "base_model.model.model.embed_tokens.lora_embedding_A": np.ones((8, 262144)),
        "base_model.model.model.embed_tokens.lora_embedding_B": np.ones((640, 8))}), ["embed_tokens"]),
    "lm_head weights": (lambda f: _add_tensors(f, {
        "base_model.model.lm_head.lora_A.weight": np.ones((8, 640)),
        "base_model.model.lm_head.lora_B.weight": np.ones((262144, 8))}), ["lm_head", "cannot apply"]),
    "norm weights": (lambda f: _add_tensors(f, {
        "base_model.model.model.layers.0.input_layernorm.lora_A.weight": np.ones((8, 640)),
        "base_model.model.model.layers.0.input_layernorm.lora_B.weight": np.ones((640, 8))}), ["input_layernorm"]),
    "vision-tower only": (lambda f: _rewrite_header(f, _to_vision_tower), ["no LoRA matrices for the text model"]),
    "shape mismatch": (lambda f: _add_tensors(f, {
        f"{_Q0}.lora_A.weight": np.ones((8, 2048)), f"{_Q0}.lora_B.weight": np.ones((1024, 8))}),
        ["blk.0.attn_q.weight", "[1024, 640]", "[8, 2048]"]),
    "layer beyond base": (lambda f: _add_tensors(f, {
        "base_model.model.model.layers.30.self_attn.q_proj.lora_A.weight": np.ones((8, 640)),
        "base_model.model.model.layers.30.self_attn.q_proj.lora_B.weight": np.ones((1024, 8))}),
        ["blk.30.attn_q.weight", "18 blocks"]),
    "truncated file": (lambda f: (f / _ST).write_bytes((f / _ST).read_bytes()[:-100]), ["truncated"]),
    "header beyond file": (lambda f: (f / _ST).write_bytes((10**9).to_bytes(8, "little") + (f / _ST).read_bytes()[8:]), ["header", "1000000000"]),
    "broken JSON": (lambda f: (f / _ST).write_bytes((f / _ST).read_bytes().replace(b'"dtype"', b'"dtype', 1)), ["JSON"]),
    "offsets beyond file": (lambda f: _rewrite_header(f, _shift_offsets), ["ends at byte"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_problem_and_write_nothing(base, tmp_path, case):
    breaker, expected = REFUSALS[case]
    folder = make_peft_adapter(tmp_path / "a", base, targets=("q_proj",), layers=[0])
    breaker(folder)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "a.gguf"
    with pytest.raises(ConversionError) as err:
        peft_to_gguf(folder, base, out)
    for text in expected:
        assert text in err.value.message, (case, err.value.message)
    assert no_output(out)


def test_rank_and_size_limits(base, tmp_path):
    folder = make_peft_adapter(tmp_path / "a", base, rank=16, layers=[0])
    with pytest.raises(ConversionError, match="rank 16.*the limit is 8"):
        peft_to_gguf(folder, base, tmp_path / "r.gguf", max_rank=8)
    with pytest.raises(ConversionError, match="MiB; the limit is"):
        peft_to_gguf(folder, base, tmp_path / "s.gguf", max_bytes=1000)
    assert no_output(tmp_path / "r.gguf") and no_output(tmp_path / "s.gguf")


def test_quantize_refuses_unknown_type_and_missing_input(base, tmp_path):
    with pytest.raises(ConversionError) as err:
        quantize(base, tmp_path / "q.gguf", "Q4_K_X")
    assert "'Q4_K_X'" in err.value.message and all(t in err.value.message for t in ("Q4_K_M", "Q8_0", "F16"))
    with pytest.raises(ConversionError, match="no GGUF file"):
        quantize(tmp_path / "missing.gguf", tmp_path / "q.gguf", "Q8_0")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ConversionError, match="could not quantize text.gguf: .*expected 'GGUF'"):
        quantize(tmp_path / "text.gguf", tmp_path / "q.gguf", "Q8_0")
    assert no_output(tmp_path / "q.gguf")


def test_merge_refuses_bad_inputs(base, qv_gguf, tmp_path):
    with pytest.raises(ConversionError, match="at least one adapter"):
        merge(base, [], tmp_path / "m.gguf")
    with pytest.raises(ConversionError, match="finite number"):
        merge(base, [(qv_gguf.out_path, float("nan"))], tmp_path / "m.gguf")
    with pytest.raises(ConversionError, match="unknown quantization type"):
        merge(base, [(qv_gguf.out_path, 1.0)], tmp_path / "m.gguf", out_type="Q9")
    with pytest.raises(ConversionError, match="not a GGUF LoRA adapter"):
        merge(base, [(base, 1.0)], tmp_path / "m.gguf")
    assert no_output(tmp_path / "m.gguf")


# --- llama.cpp: the adapter loads and acts; merging matches it ------------------------------


class Llama:
    """One model + context through llama.cpp's C API (n_ctx 256, 2 threads)."""

    def __init__(self, path: Path):
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(False)
        self.c = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        assert self.model, f"llama.cpp could not load {path}"
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 256, 256, 2, 2
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def set_adapter(self, path: Path | None, scale: float = 1.0):
        c = self.c
        if path is None:
            assert c.llama_set_adapters_lora(self.ctx, None, 0, None) == 0
            return None
        adapter = c.llama_adapter_lora_init(self.model, str(path).encode())
        assert adapter, f"llama.cpp refused the adapter {path}"
        arr = (c.llama_adapter_lora_p_ctypes * 1)(adapter)
        assert c.llama_set_adapters_lora(self.ctx, arr, 1, (ctypes.c_float * 1)(scale)) == 0
        return adapter

    def logits(self, text: bytes = PROMPT) -> np.ndarray:
        c = self.c
        tokens = (c.llama_token * 64)()
        n = c.llama_tokenize(self.vocab, text, len(text), tokens, 64, True, False)
        c.llama_memory_clear(c.llama_get_memory(self.ctx), True)
        assert c.llama_decode(self.ctx, c.llama_batch_get_one(tokens, n)) == 0
        n_vocab = c.llama_vocab_n_tokens(self.vocab)
        return np.ctypeslib.as_array(c.llama_get_logits_ith(self.ctx, -1), (n_vocab,)).copy()

    def close(self):
        self.c.llama_free(self.ctx)
        self.c.llama_model_free(self.model)


@pytest.fixture(scope="module")
def base_llama(real_base):
    llama = Llama(real_base)
    yield llama
    llama.close()


@pytest.fixture(scope="module")
def adapted_logits(base_llama, qv_gguf):
    """(base logits, logits with the q/v adapter at scale 1) for PROMPT, on the Q4_K_M base."""
    plain = base_llama.logits()
    base_llama.set_adapter(qv_gguf.out_path)
    adapted = base_llama.logits()
    base_llama.set_adapter(None)
    return plain, adapted


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


@pytest.mark.e2e
def test_llama_cpp_loads_the_adapter_and_it_changes_the_logits(base_llama, adapted_logits):
    plain, adapted = adapted_logits
    assert np.abs(adapted - plain).max() > 1.0  # measured: 5.9 max, 0.90 mean
    np.testing.assert_allclose(base_llama.logits(), plain, atol=1e-4)  # removing it restores the base


@pytest.mark.e2e
def test_merged_f16_matches_the_adapter_at_runtime(real_base, qv_adapter, work):
    """On an F16 base both paths see the same base weights, so only the merge itself differs.

    Measured: max |logit diff| 0.016-0.019 (mean 0.003), while the adapter moves logits by up to
    6.5; the bound below leaves ~5x headroom. (On the Q4_K_M base the runtime path quantizes
    activations for the matmuls, which alone gives ~0.9 max diff against any F16 model.)
    """
    f16 = quantize(real_base, work / "base-f16.gguf", "F16")
    adapter = peft_to_gguf(qv_adapter, f16, work / "qv-f16.gguf")
    info = merge(f16, [(adapter.out_path, 1.0)], work / "merged-f16.gguf")
    assert info.out_type == "F16" and len(info.merged) == 36
    runtime = Llama(f16)
    plain = runtime.logits()
    runtime.set_adapter(adapter.out_path)
    adapted = runtime.logits()
    runtime.close()
    merged_llama = Llama(info.out_path)
    merged = merged_llama.logits()
    merged_llama.close()
    assert np.abs(adapted - plain).max() > 1.0
    assert np.abs(merged - adapted).max() < 0.1
    assert merged.argmax() == adapted.argmax()
    # Scales add up: the same adapter twice at 0.5 (once as the PEFT folder) merges like once at 1.
    halves = merge(f16, [(adapter.out_path, 0.5), (qv_adapter, 0.5)], work / "merged-halves.gguf")
    halves_llama = Llama(halves.out_path)
    assert np.abs(halves_llama.logits() - merged).max() < 0.05  # only f16 rounding differs
    halves_llama.close()


@pytest.mark.e2e
def test_merge_keeps_the_base_types_and_untouched_tensors_byte_identical(real_base, qv_adapter, adapted_logits, work):
    """Q4_K_M base + PEFT folder (converted on the fly) -> Q4_K_M, through llama.cpp's quantizer."""
    steps = []
    info = merge(real_base, [(qv_adapter, 1.0)], work / "merged-q4.gguf", progress=lambda d, n: steps.append((d, n)))
    assert info.out_type == "Q4_K_M" and steps[-1] == (37, 37) and len(steps) == 37
    original, written = open_gguf(real_base), open_gguf(info.out_path)
    assert written.get_field("general.file_type").contents() == 15
    out = {t.name: t for t in written.tensors}
    for t in original.tensors:
        assert out[t.name].tensor_type == t.tensor_type, t.name
        if t.name not in info.merged:
            assert np.array_equal(out[t.name].data, t.data), f"{t.name} changed"
    plain, adapted = adapted_logits
    llama = Llama(info.out_path)
    merged = llama.logits()
    llama.close()
    # Requantizing the merged weights adds noise; the change must still point the adapter's way.
    # Measured cosine 0.88 (Q8_0 output: 0.91, F16: 0.94).
    assert cosine(merged - plain, adapted - plain) > 0.75


@pytest.mark.e2e
def test_quantize_through_llama_cpp(real_base, work):
    out = quantize(real_base, work / "q8.gguf", "q8_0")
    llama = Llama(out)
    assert llama.c.llama_model_ftype(llama.model) == llama.c.LLAMA_FTYPE_MOSTLY_Q8_0
    assert np.isfinite(llama.logits()).all()
    llama.close()


# --- the CLI ---------------------------------------------------------------------------------


def test_parse_adapter_scale():
    assert _parse_adapter("a.gguf") == ("a.gguf", 1.0)
    assert _parse_adapter("a.gguf:0.5") == ("a.gguf", 0.5)
    assert _parse_adapter("dir/with:colon") == ("dir/with:colon", 1.0)


@pytest.mark.e2e  # the embedded model's file is the default base
def test_cli_lora_uses_the_embedded_base_by_default(qv_adapter, tmp_path):
    result = CliRunner().invoke(convert, ["lora", str(qv_adapter), "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 0, result.output
    assert "rank 8, alpha 16, q_proj, v_proj on 18 layers (72 tensors)" in result.output


def test_cli_turns_refusals_into_one_line_errors(base, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(convert, ["lora", str(tmp_path / "empty"), "--base", str(base), "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "adapter_config.json" in result.output
    result = CliRunner().invoke(convert, ["quantize", str(base), str(tmp_path / "q.gguf"), "--type", "Q9"])
    assert result.exit_code == 2 and "'Q9' is not a quantization type; choose one of F32, F16" in result.output
    assert set(QUANT_TYPES) >= {"Q4_K_M", "Q8_0", "F16"}


@pytest.mark.e2e
def test_cli_merge_with_scale_and_type(real_base, qv_gguf, tmp_path):
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(convert, ["merge", str(real_base), f"{qv_gguf.out_path}:0.5", "-o", str(out), "--type", "Q8_0"])
    assert result.exit_code == 0, result.output
    assert "Q8_0, 36 weights merged" in result.output and out.exists()
