"""The decode step (generation.Decoder) without a model: stop strings held back and cut, and
log probabilities that travel with the text they complete."""

import math

import pytest

from localgemma.errors import InvalidInput
from localgemma.generation import AdapterRef, Chunk, Decoder, GenerationRequest
from localgemma.sampling import SamplingParams

PIECES = {1: b"Hel", 2: b"lo ", 3: b"wor", 4: b"ld", 5: b"!", 6: b"<e", 7: b"nd>", 8: "é".encode()[:1],
          10: "é".encode()[1:], 9: b""}


def decode(tokens, *, stop=(), logprobs=None, n=20):
    request = GenerationRequest((1,), SamplingParams(temperature=0), n, stop=tuple(stop), logprobs=logprobs)
    decoder = Decoder(request, lambda t: PIECES.get(t, b"?"), lambda t: t == 9)
    out, entries = [], []
    for token in tokens:
        logits = [0.0] * 11
        logits[token] = 2.0
        out.append(decoder.step(token, logits if logprobs is not None else None))
        entries.append([e.token for e in decoder.logprobs])
        if decoder.finish:
            break
    return out, decoder.finish, entries


@pytest.mark.parametrize("tokens, stop, pieces, finish", [
    ([1, 2, 3, 4, 5], ["world"], ["Hel", "lo ", "", ""], "stop"),  # "wor" held, then cut: never sent
    ([1, 2, 3, 6, 7, 5], ["<end>"], ["Hel", "lo ", "wor", "", ""], "stop"),
    ([1, 2, 3, 6, 9], ["<end>"], ["Hel", "lo ", "wor", "", "<e"], "stop"),  # held, then the model ends: sent
    ([1, 2, 3, 4], ["lo w"], ["He", "l", ""], "stop"),  # a stop string across pieces
    ([1, 2, 5], ["x", "lo"], ["He", "l"], "stop"),  # the first of several; "l" held, then sent
    ([1, 2], ["zzz"], ["Hel", "lo "], None),
])
def test_stop_strings_are_cut_and_never_split_across_pieces(tokens, stop, pieces, finish):
    out, got_finish, _ = decode(tokens, stop=stop)
    assert out == pieces and got_finish == finish


def test_a_held_tail_goes_out_when_the_budget_ends():
    out, finish, _ = decode([1, 2, 3, 6], stop=["<end>"], n=4)
    assert out == ["Hel", "lo ", "wor", "<e"] and finish == "length"


def test_logprobs_travel_with_their_text():
    out, _, entries = decode([1, 8, 10, 2], logprobs=2)
    assert out == ["Hel", "", "é", "lo "]
    assert entries == [["Hel"], [], ["\ufffd", "\ufffd"], ["lo "]]  # a half character's token waits for the rest
    out, _, entries = decode([1, 2, 3, 4, 5], stop=["world"], logprobs=0)
    assert out[:2] == ["Hel", "lo "] and sum(entries, []) == ["Hel", "lo "]  # the stop string's never go


def test_logprob_values_are_log_softmax_of_the_row():
    request = GenerationRequest((1,), SamplingParams(temperature=0), 5, logprobs=2)
    decoder = Decoder(request, lambda t: PIECES.get(t, b"?"), lambda t: False)
    decoder.step(3, [0.0, 1.0, 0.0, 3.0] + [0.0] * 7)
    entry = decoder.logprobs[0]
    norm = math.log(math.exp(3) + math.exp(1) + 9)
    assert entry.token == "wor" and entry.logprob == pytest.approx(3 - norm)
    assert [t for t, _, _ in entry.top] == ["wor", "Hel"] and entry.top[1][2] == pytest.approx(1 - norm)


def test_the_decode_step_decides_the_finish_reason():
    """The one decode step (engine and batcher alike): EOG or a stop token end with "stop" and
    are neither shown nor counted; the budget ends with "length"; UTF-8 is never split."""
    pieces = {1: "é".encode()[:1], 2: "é".encode()[1:], 3: b"x", 9: b"", 7: b"<turn>"}
    request = GenerationRequest((5, 6), SamplingParams(temperature=0), max_tokens=3, stop_tokens=frozenset({7}))
    decode = Decoder(request, pieces.__getitem__, lambda t: t == 9)
    assert [decode.step(t) for t in (1, 2)] == ["", "é"] and decode.finish is None
    assert decode.step(7) == "" and decode.finish == "stop" and decode.last() == Chunk("", "stop", 2, 2)
    decode = Decoder(request, pieces.__getitem__, lambda t: t == 9)
    assert [decode.step(t) for t in (3, 3, 1)] == ["x", "x", ""] and decode.finish == "length"
    assert decode.last() == Chunk("", "length", 2, 3)  # the half character cut off by the budget is dropped
    decode = Decoder(request, pieces.__getitem__, lambda t: t == 9)
    assert decode.step(9) == "" and decode.last().finish_reason == "stop" and decode.last().completion_tokens == 0


@pytest.mark.parametrize("fields, message", [
    (dict(tokens=()), "the prompt has no tokens"),
    (dict(max_tokens=0), "max_tokens: 0"),
    (dict(adapters=(AdapterRef("a.gguf", float("nan")),)), "lora: scale nan"),
    (dict(sampling=None), None),
])
def test_a_generation_request_checks_its_invariants_where_it_is_built(fields, message):
    if message is None:
        with pytest.raises(InvalidInput, match="temperature: inf"):
            SamplingParams(temperature=float("inf"))
        return
    with pytest.raises(InvalidInput, match=message):
        GenerationRequest(**{"tokens": (2,), "sampling": SamplingParams(temperature=0), "max_tokens": 4, **fields})


# -- Prepared: the same items pulled (run) and pushed (push, as the batch thread does) ------------

class _Batcher:
    """Batcher.submit's contract: emit each chunk, in order, from the batcher's side."""

    def __init__(self, chunks):
        self.chunks, self.cancelled = chunks, False

    def submit(self, request, emit):
        for chunk in self.chunks:
            emit(chunk)
        return lambda: setattr(self, "cancelled", True)


def _prepared(chunks, schema=None):
    from types import SimpleNamespace

    from localgemma.runtime import Prepared

    batcher = _Batcher(chunks)
    request = GenerationRequest((1,), SamplingParams(temperature=0), 5)
    return Prepared(SimpleNamespace(batcher=lambda engine: batcher), None, request, 5, schema), batcher


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_pushed_items_are_the_pulled_ones_and_a_failing_result_is_emitted_not_raised(finish):
    from localgemma.generation import Result
    from localgemma.errors import StructuredOutputError

    chunks = [Chunk('{"a"'), Chunk(": 1}" if finish == "stop" else ": 1"), Chunk("", finish, 3, 2)]
    prepared, batcher = _prepared(chunks, schema={"type": "object"})
    pushed = []
    stop = prepared.push(pushed.append)
    if finish == "length":  # cut short inside the JSON: the schema's error is the request's answer, sent as an item
        assert [type(x) for x in pushed] == [Chunk, Chunk, StructuredOutputError]
        with pytest.raises(StructuredOutputError, match="max_tokens"):
            list(prepared.run(c for c in chunks))
        return
    pulled = list(prepared.run(c for c in chunks))
    assert pushed == pulled and isinstance(pushed[-1], Result) and pushed[-1].value == {"a": 1}
    stop()
    assert batcher.cancelled
