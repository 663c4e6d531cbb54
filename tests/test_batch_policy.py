"""The batch scheduling policy as a pure object: admission, fairness, adapter-set hand-over.
(The batcher that runs it on the real model: tests/test_batching.py.)"""

from __future__ import annotations

from localgemma.batching import FAIR_STEPS, MIN_REUSE, BatchPolicy, shared_prefix


class Req:
    def __init__(self, name: str, need: int = 10, group: tuple = (), since: int = 0, tokens: tuple = (1, 2)):
        self.name, self.need, self.group, self.since, self.seq = name, need, group, since, -1
        self.tokens, self.reuse = tokens, None

    def __repr__(self):
        return self.name


def names(reqs) -> list[str]:
    return [r.name for r in reqs]


def step(policy: BatchPolicy) -> list[str]:
    """What the loop does between decode steps (without llama.cpp)."""
    group = policy.switch_to()
    if group is not None:
        policy.group = group
    return names(policy.admit())


def test_slots_and_kv_cells_bound_admission_first_come_first_served():
    policy = BatchPolicy(parallel=3, n_ctx=100)
    policy.waiting.extend([Req("a", 40), Req("b", 40), Req("c", 40), Req("d", 5)])
    assert step(policy) == ["a", "b"]  # c does not fit the cells left, and d may not overtake it
    assert sorted(policy.running) == [0, 1] and len(policy.free) == 1
    policy.leave(next(r for r in policy.running.values() if r.name == "a"))
    assert step(policy) == ["c", "d"]
    assert not policy.waiting and not policy.free


def test_a_request_too_big_for_the_pool_is_not_the_batchs():
    policy = BatchPolicy(parallel=2, n_ctx=100)
    assert policy.fits_alone(100) and not policy.fits_alone(101)


def test_only_the_running_adapter_set_is_admitted_and_sets_take_turns():
    policy = BatchPolicy(parallel=4, n_ctx=1000)
    a, b = ("adapter-a",), ("adapter-b",)
    policy.waiting.extend([Req("base1"), Req("a1", group=a), Req("base2"), Req("b1", group=b)])
    assert policy.switch_to() == ()  # the context's set is unknown at first: the oldest request's (none)
    assert step(policy) == ["base1", "base2"]
    for r in list(policy.running.values()):
        policy.leave(r)
    assert step(policy) == ["a1"] and policy.group == a  # round-robin: the oldest other set
    policy.waiting.append(Req("a2", group=a))
    assert step(policy) == ["a2"]  # while its set runs, it keeps admitting its own
    for r in list(policy.running.values()):
        policy.leave(r)
    assert step(policy) == ["b1"] and policy.group == b


def test_a_set_that_keeps_another_waiting_hands_over():
    policy = BatchPolicy(parallel=2, n_ctx=1000)
    policy.waiting.extend([Req("base1"), Req("adapter", group=("a",), since=0)])
    assert step(policy) == ["base1"]
    policy.waiting.append(Req("base2"))
    policy.steps = FAIR_STEPS  # not yet starving: the base set may still admit its own
    assert step(policy) == ["base2"]
    policy.leave(policy.running[1])
    policy.waiting.append(Req("base3"))
    policy.steps = FAIR_STEPS + 1  # now the adapter request has waited too long
    assert step(policy) == []  # nobody new for the base set: it drains
    policy.leave(next(iter(policy.running.values())))
    assert step(policy) == ["adapter"] and policy.group == ("a",)


def test_prompts_that_arrive_together_are_prefilled_half_at_a_time_first_come_first():
    prefill = BatchPolicy.prefill
    # a wave of eight 16-token prompts: four, then the other four (all owed: passed over once),
    # not two and two more, which would put the last first token a step later
    assert prefill([16] * 8, room=512) == [16] * 4
    assert prefill([16] * 4, room=508, owed=4) == [16] * 4
    assert prefill([16] * 4, room=508) == [16] * 2
    assert prefill([16] * 7, room=511) == [16] * 4  # half rounded up
    # owed prompts come first; newcomers behind them fill up to half of all that waits
    assert prefill([16] * 3 + [16] * 5, room=505, owed=3) == [16] * 4
    assert prefill([16] * 2 + [16] * 2, room=506, owed=2) == [16] * 2
    assert prefill([16] * 3, room=20, owed=3) == [16, 4]  # the room still bounds them
    assert prefill([16], room=510) == [16]
    # a long prompt alone is taken whole, up to the batch's room: its first token is not delayed
    assert prefill([900], room=512) == [512]
    assert prefill([388], room=512) == [388]
    # in order: a prompt started in an earlier step finishes first, and a long one is not split
    # to make the half exact
    assert prefill([5, 40, 40], room=512) == [5, 40]
    assert prefill([300, 10, 10], room=512) == [300]
    # room is shared with the decoding sequences' tokens
    assert prefill([13, 13, 13, 13], room=20) == [13, 7]
    assert prefill([13], room=0) == []
    assert prefill([], room=512) == []


# -- prefix cache ---------------------------------------------------------------------------

def test_shared_prefix_is_the_longest_common_start_within_the_limit():
    a = tuple(range(100))
    assert shared_prefix(a, a, 1000) == 100 and shared_prefix(a, a, 99) == 99
    for k in (0, 1, 37, 63, 99):
        b = a[:k] + (-1,) + a[k + 1:]
        assert shared_prefix(a, b, 1000) == k
    assert shared_prefix(a, a[:10], 1000) == 10 and shared_prefix((), a, 5) == 0 and shared_prefix(a, a, -1) == 0


def test_a_finished_sequence_is_reused_by_a_prompt_that_starts_the_same_way():
    policy = BatchPolicy(parallel=2, n_ctx=1000)
    step(policy)
    turn1 = tuple(range(1, 21))  # prompt and reply, as they are in the KV cache
    cid = policy.keep_tokens(turn1)
    assert policy.parallel <= cid < policy.parallel + policy.keep == 4 and not policy.dropped
    turn2 = Req("turn2", tokens=turn1 + (7, 8))
    other = Req("other", tokens=turn1[:MIN_REUSE - 1] + (9, 9, 9))  # too little in common
    policy.waiting.extend([turn2, other])
    assert step(policy) == ["turn2", "other"]
    assert turn2.reuse == (cid, 20) and other.reuse is None
    same = Req("same", tokens=turn1)  # the whole prompt cached: its last token is still decoded
    policy.waiting.append(same)
    policy.leave(turn2)
    assert step(policy) == ["same"] and same.reuse == (cid, 19)


def test_cached_sequences_give_way_to_requests_and_to_longer_ones_of_their_own():
    policy = BatchPolicy(parallel=2, n_ctx=100, keep=2, keep_cells=100)
    step(policy)
    a = policy.keep_tokens(tuple(range(30)))
    b = policy.keep_tokens((7,) * 30)
    assert policy.keep_tokens((1,) * (MIN_REUSE - 1)) is None and list(policy.cached) == [a, b]
    longer = policy.keep_tokens(tuple(range(40)))  # holds all that `a` does: `a` goes
    assert policy.dropped == [a] and list(policy.cached) == [b, longer]
    policy.dropped.clear()
    third = policy.keep_tokens((5,) * 10)  # no id left: the least recently used goes
    assert policy.dropped == [b] and list(policy.cached) == [longer, third]
    policy.dropped.clear()
    # cells: 40 + 10 cached; a request needing 60 fits only once the cache makes room, and the
    # sequence it reuses is the last to go (its cells are copied before anything is dropped)
    big = Req("big", need=60, tokens=tuple(range(20)) + (99,))
    policy.waiting.append(big)
    assert step(policy) == ["big"] and big.reuse == (longer, 20)
    assert policy.dropped == [third] and list(policy.cached) == [longer]
    too_big = Req("too big", need=50)  # 60 running + 50 > 100 with no cache at all: it waits
    policy.waiting.append(too_big)
    assert step(policy) == [] and list(policy.cached) == [longer]
    policy.forget()  # an adapter switch clears the memory
    assert not policy.cached and len(policy.cache_free) == 2


def test_cached_cells_stay_within_their_budget():
    policy = BatchPolicy(parallel=4, n_ctx=1000)  # keeps at most half the context: 500 cells
    step(policy)
    assert policy.keep_cells == 500 and policy.keep_tokens((3,) * 501) is None
    first = policy.keep_tokens((1,) * 200)
    second = policy.keep_tokens((2,) * 200)
    third = policy.keep_tokens((3,) * 200)  # 600 > 500: the least recently used goes
    assert policy.dropped == [first] and list(policy.cached) == [second, third]
