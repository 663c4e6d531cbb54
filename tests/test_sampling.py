"""The contract -> llama.cpp sampler mapping (fast, no model)."""

import pytest

from localgemma.contract import parse_inputs
from localgemma.sampling import U32, SamplingParams, llama_seed, plan


def steps(**fields):
    return plan(SamplingParams.from_inputs(parse_inputs({"prompt": "x", **fields})))


def names(**fields):
    return [s[0] for s in steps(**fields)]


def test_defaults_truncate_nothing():
    # llama-cpp-python would add top_k 40, top_p 0.95, min_p 0.05 and a repeat penalty.
    assert names(seed=5) == ["temp", "dist"]
    assert steps(seed=5) == [("temp", 0.6), ("dist", 5)]


def test_temperature_zero_is_greedy():
    assert names(temperature=0) == ["greedy"]
    assert names(temperature=0, top_k=5, top_p=0.5) == ["greedy"]


def test_top_p_at_or_above_one_means_no_truncation():
    assert "top_p" not in names(top_p=1)
    assert "top_p" not in names(top_p=1.7)
    assert ("top_p", 0.9, 1) in steps(top_p=0.9)


def test_order_matches_llama_cpp():
    assert names(top_k=10, top_p=0.5, repetition_penalty=1.2, temperature=1, seed=3) == [
        "penalties", "top_k", "top_p", "temp", "dist"]


def test_penalties_mapping():
    assert steps(repetition_penalty=1.3, seed=1)[0] == ("penalties", -1, 1.3, 0.0, 0.0)
    assert steps(frequency_penalty=0.5, presence_penalty=0.25, seed=1)[0] == ("penalties", -1, 1.0, 0.5, 0.25)
    assert "penalties" not in names(repetition_penalty=1)
    assert "penalties" not in names(repetition_penalty=0)  # 0 would divide by zero: off
    assert steps(temperature=0, frequency_penalty=1)[0][0] == "penalties"  # penalties still apply when greedy


def test_seed_mapping():
    assert llama_seed(1) == 1 and llama_seed(42) == 42 and llama_seed(U32 - 1) == U32 - 1
    big = [U32, U32 + 1, 2**32 + 1, 9999999999]
    mapped = [llama_seed(s) for s in big]
    assert all(0 <= m < U32 for m in mapped)  # never llama.cpp's "random" sentinel 0xFFFFFFFF
    assert len(set(mapped)) == len(big)
    assert llama_seed(2**32 + 1) != llama_seed(1)
    assert mapped == [llama_seed(s) for s in big]  # deterministic


def test_no_seed_is_random():
    assert len({llama_seed(None) for _ in range(8)}) > 1


def test_plain_greedy_reads_the_row_itself_and_anything_else_stays_llama_cpps():
    from localgemma.sampling import ChainSampler, GreedySampler, realise

    assert isinstance(realise(plan(SamplingParams(temperature=0)), None, 262144, 512), GreedySampler)
    with_penalty = realise(plan(SamplingParams(temperature=0, repetition_penalty=1.3)), None, 262144, 512)
    try:
        assert isinstance(with_penalty, ChainSampler)  # penalties keep state: llama.cpp's chain
    finally:
        with_penalty.free()


@pytest.mark.e2e
def test_greedy_picks_the_token_llama_cpps_greedy_sampler_picks(embedded_gguf):
    """Step by step on the real model, and on a row with a tie (both keep the first maximum)."""
    import llama_cpp
    import numpy as np

    from localgemma.engine import Engine
    from localgemma.sampling import ChainSampler, GreedySampler, _chain

    engine = Engine(embedded_gguf, n_ctx=256)
    fast = GreedySampler(engine.n_vocab)
    native = ChainSampler(_chain([("greedy",)], engine._vocab, engine.n_vocab, engine.n_ctx))
    try:
        engine._prefill(engine.tokenize("The three primary colours are", add_bos=True))
        picked = []
        for _ in range(32):
            token = fast.sample(engine._ctx)
            assert token == native.sample(engine._ctx)
            picked.append(token)
            engine._decode(llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(token), 1))
        assert len(set(picked)) > 5  # real text, not one token over and over
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(engine._ctx, -1), shape=(engine.n_vocab,))
        row[[7, 4242, 90000]] = row.max() + 1.0
        assert fast.sample(engine._ctx) == native.sample(engine._ctx) == 7
    finally:
        native.free()
        engine.close()


def _llama_cpp_distribution(steps, row):
    """What llama.cpp's own chain leaves to draw from: (ids, probabilities), applied to `row`
    through the C API (no model needed)."""
    import ctypes

    import llama_cpp
    import numpy as np

    from localgemma.constrained import TOKEN_DATA
    from localgemma.sampling import _chain

    data = np.zeros(len(row), TOKEN_DATA)
    data["id"], data["logit"] = np.arange(len(row)), row
    arr = llama_cpp.llama_token_data_array(data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(row),
                                           selected=-1, sorted=False)
    chain = _chain(steps, None, len(row), 512)
    try:
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
    finally:
        llama_cpp.llama_sampler_free(chain)
    kept = data[:arr.size]
    weights = np.exp(kept["logit"].astype(np.float64) - kept["logit"].max())
    return kept["id"], weights / weights.sum()


@pytest.mark.parametrize("fields", [
    {"temperature": 0.6}, {"temperature": 1.3, "top_k": 40}, {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 0.2, "top_p": 0.35}, {"temperature": 2.0, "top_k": 50, "top_p": 0.8},
    {"temperature": 1, "top_k": 1},
])
def test_unseeded_draws_come_from_the_distribution_llama_cpps_chain_leaves(fields):
    import numpy as np

    from localgemma.sampling import DrawSampler, make_sampler

    params = SamplingParams(**fields)
    sampler = make_sampler(params, None, 4096, 512)
    assert isinstance(sampler, DrawSampler)  # no seed: numpy's draw, not llama.cpp's sort of the vocabulary
    rng = np.random.default_rng(11)
    row = (rng.standard_normal(4096) * 2.5).astype(np.float32)
    row[rng.choice(4096, 12, replace=False)] += 9  # a peaked row, like a model's
    ids, probs = sampler.probabilities(row)
    steps = [s for s in plan(SamplingParams(**fields, seed=1)) if s[0] != "dist"]
    their_ids, their_probs = _llama_cpp_distribution(steps, row)
    assert sorted(ids.tolist()) == sorted(their_ids.tolist())
    ours = dict(zip(ids.tolist(), probs.tolist()))
    assert max(abs(ours[i] - p) for i, p in zip(their_ids.tolist(), their_probs.tolist())) < 1e-5


def test_a_seed_keeps_llama_cpps_chain_and_its_draws():
    from localgemma.sampling import ChainSampler, make_sampler

    sampler = make_sampler(SamplingParams(temperature=0.6, seed=42), None, 4096, 512)
    try:
        assert isinstance(sampler, ChainSampler)
    finally:
        sampler.free()


def test_the_draw_lands_where_the_running_sum_says_across_blocks_and_zero_weights():
    import numpy as np

    from localgemma.sampling import DRAW_BLOCK, _draw

    rng = np.random.default_rng(5)
    for n in (7, DRAW_BLOCK, 3 * DRAW_BLOCK + 77):
        weights = rng.random(n).astype(np.float32) ** 4
        weights[rng.choice(n, n // 3, replace=False)] = 0  # never drawn
        ends = np.cumsum(weights, dtype=np.float64)
        for u in np.concatenate([np.linspace(0, 1, 2001, endpoint=False), [1 - 1e-12]]):
            i = _draw(weights, float(u))
            assert weights[i] > 0
            assert i == int(np.searchsorted(ends, u * ends[-1], side="right"))  # ends[i-1] <= u*sum < ends[i]
