"""Prompt-prefix reuse never changes an answer: the same request gives the same text whether
its prefix came from the cache or was computed cold."""

import pytest

from localgemma.engine import Engine
from localgemma.generation import GenerationRequest
from localgemma.sampling import SamplingParams

pytestmark = pytest.mark.e2e

SYSTEM = "You are a meticulous assistant. " + " ".join(
    f"Rule {i}: answer precisely, cite facts, and never invent a number." for i in range(60))
QUESTIONS = ["What is the tallest mountain?", "Name a prime number above 100.", "Why is the sky blue?"]


def prompt(engine, question, turns=()):
    text = f"<start_of_turn>user\n{SYSTEM}\n\n{question}<end_of_turn>\n"
    for answer, follow_up in turns:
        text += f"<start_of_turn>model\n{answer}<end_of_turn>\n<start_of_turn>user\n{follow_up}<end_of_turn>\n"
    return engine.tokenize(text + "<start_of_turn>model\n", special=True, add_bos=True)


def generate(engine, ids, params):
    return "".join(c.text for c in engine.generate(GenerationRequest(tuple(ids), params, 24)))


@pytest.fixture(scope="module")
def engine(embedded_gguf):
    e = Engine(embedded_gguf, n_ctx=4096)
    yield e
    e.close()


PARAMS = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=77)]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_cached_prefix_gives_the_cold_answer(embedded_gguf, engine, params):
    cold = {}
    for q in QUESTIONS:  # each on a fresh engine: nothing cached
        fresh = Engine(embedded_gguf, n_ctx=4096)
        cold[q] = generate(fresh, prompt(fresh, q), params)
        fresh.close()
    assert len(prompt(engine, QUESTIONS[0])) > 2 * engine.n_batch  # the prefix spans whole slices
    warm = []
    for q in QUESTIONS + QUESTIONS[::-1]:
        warm.append(generate(engine, prompt(engine, q), params))
        assert engine.reused_tokens % engine.n_batch == 0
    assert engine.reused_tokens > 0  # the cache was really used
    assert warm == [cold[q] for q in QUESTIONS + QUESTIONS[::-1]]


def test_a_conversation_growing_turn_by_turn(embedded_gguf, engine):
    """Chat: each request repeats the last one plus the model's answer and a new question."""
    turns, warm = [], []
    for follow_up in ("Shorter, please.", "Now in French.", "Thanks."):
        ids = prompt(engine, QUESTIONS[0], turns)
        warm.append(generate(engine, ids, PARAMS[0]))
        turns.append((warm[-1], follow_up))
    fresh = Engine(embedded_gguf, n_ctx=4096)
    cold = [generate(fresh, prompt(fresh, QUESTIONS[0], turns[:i]), PARAMS[0]) for i in range(3)]
    fresh.close()
    assert warm == cold


def test_same_prompt_twice_is_identical_and_reuses(engine):
    ids = prompt(engine, QUESTIONS[1])
    first = generate(engine, ids, PARAMS[0])
    second = generate(engine, ids, PARAMS[0])
    assert first == second and engine.reused_tokens == (len(ids) - 1) // engine.n_batch * engine.n_batch


def test_short_prompts_never_reuse_partial_slices(engine):
    ids = engine.tokenize("The capital of France is", add_bos=True)
    generate(engine, ids, PARAMS[0])
    generate(engine, ids, PARAMS[0])
    assert engine.reused_tokens == 0
