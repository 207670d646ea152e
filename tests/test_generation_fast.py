"""The fast generation engine gives the same greedy tokens as transformers' ``generate``.

Tiny random models run in float64 (Gemma 2 in float32, see tests/test_generation.py) so that argmaxes do not tie. Random
models rarely emit an end-of-turn token, so tests that need answers ending at different times pick stop tokens
from what the model actually generates.
"""

from __future__ import annotations

import collections
import random

import pytest
import torch
from tiny import tiny_model

from personaxis.chat import render_prompt
from personaxis.generation import SamplingConfig, generate, generate_ids
from personaxis.interventions import Add, FloorCap
from personaxis.models import LoadedModel

WORDS = "pirate ghost moon sea fox dog rainbow fear who are you tell me about yourself explain the quick brown".split()


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        convo = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))}]
        if i % 3 == 1:
            convo.insert(0, {"role": "system", "content": "You are a pirate."})
        out.append(convo)
    return out


@pytest.fixture(scope="module", params=[("llama", torch.float64), ("qwen2", torch.float64), ("gemma2", torch.float32)])
def lm(request) -> LoadedModel:
    kind, dtype = request.param
    return tiny_model(kind, dtype=dtype)


def interventions_for(lm: LoadedModel) -> dict:
    # Mild enough that answers still vary (strong steering makes a tiny random model repeat one token).
    v = torch.randn(lm.profile.hidden_size, generator=torch.Generator().manual_seed(3), dtype=lm.model.dtype)
    u = v / v.norm()
    return {1: [Add(u, alpha=0.2)], 2: [FloorCap(u, tau=0.0)]}


def common_tokens(outputs: list[list[int]], n: int = 2) -> list[int]:
    """Tokens that occur in some answers but not most: as stop tokens they end answers at different times."""
    counts = collections.Counter(t for out in outputs for t in set(out))
    return [t for t, c in counts.most_common() if c < 0.6 * len(outputs)][:n]


@pytest.mark.parametrize("steered", [False, True])
def test_fast_equals_hf_with_stops(lm, steered):
    prompts = [render_prompt(lm.tokenizer, c, lm.profile) for c in conversations(24)]
    assert len({len(p) for p in prompts}) > 5  # unequal prompt lengths
    interventions = interventions_for(lm) if steered else None
    free = generate_ids(lm, prompts, SamplingConfig(max_new_tokens=24), interventions=interventions, stop_ids=[])
    assert all(len(o) == 24 for o in free)
    stops = common_tokens(free)
    # One at a time (on a few prompts); continuous batching with refills; everything in one batch.
    for batch_size, n in ((1, 6), (5, len(prompts)), (64, len(prompts))):
        config = SamplingConfig(max_new_tokens=24, batch_size=batch_size)
        fast = generate_ids(lm, prompts[:n], config, interventions=interventions, stop_ids=stops)
        hf = generate_ids(lm, prompts[:n], config, interventions=interventions, stop_ids=stops, engine="hf")
        assert fast == hf, f"batch_size={batch_size}"
    lengths = {len(o) for o in fast}
    assert len(lengths) >= 3 and 24 in lengths  # answers ended at different times, some ran to the limit
    assert all(o[-1] in stops for o in fast if len(o) < 24)


def test_generate_text_matches_hf(lm):
    convs = conversations(9, seed=1)
    interventions = interventions_for(lm)
    for iv in (None, interventions):
        config = SamplingConfig(max_new_tokens=16, batch_size=4)
        assert generate(lm, convs, config, interventions=iv) == generate(
            lm, convs, config, interventions=iv, engine="hf"
        )


def test_min_new_tokens_and_equal_lengths(lm):
    prompts = [render_prompt(lm.tokenizer, c, lm.profile) for c in conversations(6)]
    free = generate_ids(lm, prompts, SamplingConfig(max_new_tokens=10), stop_ids=[])
    stops = common_tokens(free)
    config = SamplingConfig(max_new_tokens=10, batch_size=4)
    fast = generate_ids(lm, prompts, config, stop_ids=stops, min_new_tokens=10)
    hf = generate_ids(lm, prompts, config, stop_ids=stops, min_new_tokens=10, engine="hf")
    assert fast == hf
    assert all(len(o) == 10 for o in fast)


def test_intervention_changes_output_and_hooks_are_removed(lm):
    from personaxis.hooks import hook_count

    convs = conversations(4)
    config = SamplingConfig(max_new_tokens=12)
    before = hook_count(lm)
    plain = generate(lm, convs, config)
    steered = generate(lm, convs, config, interventions=interventions_for(lm))
    assert [g.text for g in plain] != [g.text for g in steered]
    assert hook_count(lm) == before


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama):
    convs = conversations(10, seed=2)
    config = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5, batch_size=3)
    first = generate(tiny_llama, convs, config)
    assert first == generate(tiny_llama, convs, config)
    # Each answer has its own seeded generator: batch size and neighbours do not change it.
    wide = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5, batch_size=64)
    assert first == generate(tiny_llama, convs, wide)
    other = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=6, batch_size=3)
    assert [g.text for g in first] != [g.text for g in generate(tiny_llama, convs, other)]
    greedy = generate(tiny_llama, convs, SamplingConfig(max_new_tokens=12))
    assert [g.text for g in first] != [g.text for g in greedy]


def test_top_p_keeps_the_most_likely_mass(tiny_llama):
    # With a tiny top_p only the most likely token survives: sampling becomes greedy.
    convs = conversations(5, seed=3)
    greedy = generate(tiny_llama, convs, SamplingConfig(max_new_tokens=10))
    nucleus = generate(tiny_llama, convs, SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=1))
    assert greedy == nucleus


def test_edge_cases(tiny_llama):
    assert generate_ids(tiny_llama, [], SamplingConfig()) == []
    with pytest.raises(ValueError, match="engine"):
        generate_ids(tiny_llama, [[1, 2]], SamplingConfig(), engine="nope")  # type: ignore[arg-type]
    one = generate_ids(tiny_llama, [[5, 6, 7]], SamplingConfig(max_new_tokens=1))
    assert len(one) == 1 and len(one[0]) == 1


@pytest.mark.slow
@pytest.mark.model
def test_embedded_fast_equals_hf(embedded_lm):
    questions = [
        "Tell me about yourself.",
        "What do you fear most?",
        "Explain how rainbows form, briefly.",
        "Write one sentence about the sea.",
        "What is 2 + 2?",
    ]
    convs = [[{"role": "user", "content": q}] for q in questions]
    convs.append([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Who are you?"}])
    hidden = embedded_lm.profile.hidden_size
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    layer = embedded_lm.profile.target_layer
    for interventions in (None, {layer: [Add(v / v.norm(), alpha=4.0)], layer + 1: [FloorCap(v, tau=0.0)]}):
        config = SamplingConfig(max_new_tokens=32, batch_size=4)
        fast = generate(embedded_lm, convs, config, interventions=interventions)
        hf = generate(embedded_lm, convs, config, interventions=interventions, engine="hf")
        assert [g.text for g in fast] == [g.text for g in hf]
        assert [g.new_tokens for g in fast] == [g.new_tokens for g in hf]


def test_draw_follows_the_weights():
    from personaxis.generation.sampling import draw, nucleus

    weights = torch.tensor([[0.0, 0.5, 0.3, 0.2, 0.0]]).repeat(40000, 1)
    counts = torch.bincount(draw(weights, torch.rand(40000, generator=torch.Generator().manual_seed(0))), minlength=5)
    assert counts[0] == 0 and counts[4] == 0
    assert torch.allclose(counts[1:4] / 40000.0, torch.tensor([0.5, 0.3, 0.2]), atol=0.02)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert (nucleus(probs, 0.79) > 0).tolist() == [[True, True, False, False]]
    assert (nucleus(probs, 0.81) > 0).tolist() == [[True, True, True, False]]
    assert (nucleus(probs, 1e-6) > 0).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("vocabulary", [49152, 151936, 50257, 256, 64])
def test_greedy_tokens_is_argmax_index_for_index(vocabulary):
    """Blockwise greedy choice: the same index as ``argmax`` (first of equal maxima, first NaN), on every path."""
    from personaxis.generation.sampling import greedy_tokens

    g = torch.Generator().manual_seed(vocabulary)
    logits = torch.randn(12, vocabulary, generator=g)
    logits[1] = 0.0  # every logit equal: the first
    logits[2, -1] = logits[2, 3] = 50.0  # equal maxima in two blocks: the first
    logits[3, 5] = logits[3, 6] = 50.0  # equal maxima in one block
    logits[4] = float("-inf")
    logits[5, -1] = float("inf")
    logits[6, vocabulary // 2] = float("nan")  # a NaN wins, as in argmax
    logits[7, 1] = -0.0
    logits[7, 0] = 0.0
    logits[7, 2:] = -1.0
    logits[8].round_()  # many ties
    for rows in (logits, logits[:0], logits[9:10], logits.to(torch.bfloat16), logits.t().contiguous().t()):
        assert torch.equal(greedy_tokens(rows), rows.argmax(dim=-1))
    no_nan = torch.cat([logits[:6], logits[7:]])
    assert torch.equal(greedy_tokens(no_nan), no_nan.argmax(dim=-1))


@pytest.mark.parametrize("steered", [False, True])
def test_shared_prefixes_are_computed_once(lm, steered, monkeypatch):
    from personaxis.generation.engine import FastEngine

    calls: list[int] = []
    original = FastEngine._prefill_shared

    def counting(self, groups, shared, *rest):
        calls.append(sum(len(g) for g in groups))
        return original(self, groups, shared, *rest)

    monkeypatch.setattr(FastEngine, "_prefill_shared", counting)
    systems = [
        "You are a pirate who sails the seven seas and sings to the moon about the ghost of the sea.",
        "You are the quick brown fox who jumps over the lazy dog and explains how rainbows form.",
    ]
    convs = [
        [{"role": "system", "content": systems[i % 2]}, {"role": "user", "content": q}]
        for i, q in enumerate(
            [
                "Who are you?",
                "Tell me about yourself.",
                "What do you fear most?",
                "Arr!",
                "Explain how rainbows form.",
                "Who?",
                "What is the sea?",
                "abc",
            ]
        )
    ]
    convs += conversations(3, seed=4)  # prompts with no shared prefix join the same batch
    prompts = [render_prompt(lm.tokenizer, c, lm.profile) for c in convs]
    interventions = interventions_for(lm) if steered else None
    free = generate_ids(lm, prompts, SamplingConfig(max_new_tokens=16), interventions=interventions, stop_ids=[])
    stops = common_tokens(free)
    for batch_size in (3, 64):
        config = SamplingConfig(max_new_tokens=16, batch_size=batch_size)
        calls.clear()
        fast = generate_ids(lm, prompts, config, interventions=interventions, stop_ids=stops)
        if lm.profile.name != "tiny-gemma2":  # sliding-window caches take no shared prefixes
            assert calls, "no prefix was shared"
        assert fast == generate_ids(lm, prompts, config, interventions=interventions, stop_ids=stops, engine="hf")


def test_prefix_groups():
    from personaxis.generation.prefill_plan import prefix_groups

    system = list(range(100, 120))
    prompts = [system + [1, 2], [7, 8, 9], system + [3], system + [4, 5, 6], system]
    groups = prefix_groups(prompts)
    assert len(groups) == 1
    members, length = groups[0]
    # ``system`` alone must keep one token of its own, so the shared prefix is one token shorter than it.
    assert sorted(members) == [0, 2, 3, 4] and length == len(system) - 1
    assert prefix_groups([[1, 2, 3], [1, 2, 4]]) == []  # saves less than a group costs
    assert prefix_groups([system + list(range(200)), system + [1]]) == []  # saves too little of the chunk's work
    # A short role prompt shared by many questions is worth sharing, each role its own group; what all roles share
    # (the template's first tokens) is not worth a group of its own.
    template, questions = [1, 2, 3], [[50 + q, 60 + q, 70 + q, 80 + q] for q in range(12)]
    roles = [[10 + r, 20 + r, 30 + r, 40 + r, 5] for r in range(3)]
    prompts = [template + role + question for role in roles for question in questions]
    groups = prefix_groups(prompts)
    assert sorted((sorted(m), n) for m, n in groups) == [(list(range(12 * r, 12 * r + 12)), 8) for r in range(3)]


def test_prefix_groups_are_the_cheapest_runs():
    """The groups' cost (tokens computed, ``GROUP_TOKENS`` per group) is the least over every split of the sorted
    prompts into runs, on random prompts with common prefixes."""
    from personaxis.generation.prefill_plan import GROUP_TOKENS, common_prefix_length, prefix_groups

    def run_cost(prompts: list[list[int]], run: list[int]) -> int:
        if len(run) == 1:
            return len(prompts[run[0]])
        shared = min(
            min(len(prompts[i]) - 1 for i in run),
            min(common_prefix_length(prompts[a], prompts[b]) for a, b in zip(run, run[1:], strict=False)),
        )
        if shared <= 0:
            return sum(len(prompts[i]) for i in run)  # a group sharing nothing is no group
        return shared + sum(len(prompts[i]) - shared for i in run) + GROUP_TOKENS

    rng = random.Random(5)
    for _ in range(40):
        stems = [[rng.randint(1, 3) for _ in range(rng.randint(0, 12))] for _ in range(3)]
        prompts = [rng.choice(stems) + [rng.randint(1, 4) for _ in range(rng.randint(1, 6))] for _ in range(6)]
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        groups = prefix_groups(prompts, check_cost=False)
        grouped = [i for members, _ in groups for i in members]
        assert len(grouped) == len(set(grouped))
        cost = sum(n + sum(len(prompts[i]) - n for i in m) + GROUP_TOKENS for m, n in groups)
        cost += sum(len(p) for i, p in enumerate(prompts) if i not in grouped)
        for members, n in groups:  # each group shares what it says, and every member keeps a token
            assert all(prompts[i][:n] == prompts[members[0]][:n] and len(prompts[i]) > n for i in members)
        best = min(
            sum(run_cost(prompts, [order[i] for i in run]) for run in runs)
            for k in range(1, len(order) + 1)
            for runs in _runs(list(range(len(order))), k)
        )
        assert cost == best


def _runs(items: list[int], k: int):
    """Every split of ``items`` into ``k`` runs of consecutive items."""
    if k == 1:
        yield [items]
        return
    for cut in range(1, len(items) - k + 2):
        for rest in _runs(items[cut:], k - 1):
            yield [items[:cut], *rest]


def test_kv_cache_budget_grows_with_free_gpu_memory(monkeypatch):
    from personaxis.generation import engine

    assert engine.kv_cache_budget(torch.device("cpu")) == engine.KV_CACHE_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 1024**3, 80 * 1024**3))
    assert engine.kv_cache_budget(torch.device("cuda", 0)) == 20 * 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024**3, 80 * 1024**3))
    assert engine.kv_cache_budget(torch.device("cuda", 0)) == engine.KV_CACHE_BYTES  # never below the floor


def test_a_finished_batch_frees_its_cache_before_the_next_prefill(tiny_llama, monkeypatch):
    """When every row of a batch is done, its key/value cache is gone before the next prompts' cache is made: the
    peak holds one batch's cache, not two (200 MB of the quick preset's peak at 32 rows)."""
    import gc
    import weakref

    from personaxis.generation import cache as kv
    from personaxis.generation import engine

    made: list[weakref.ref] = []
    plain_cache = kv._plain_cache

    def recorded(model):
        cache = plain_cache(model)
        made.append(weakref.ref(cache))
        return cache

    alive: list[int] = []
    prefill = engine.FastEngine._prefill

    def counting(self, rows):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        return prefill(self, rows)

    monkeypatch.setattr(kv, "_plain_cache", recorded)
    monkeypatch.setattr(engine.FastEngine, "_prefill", counting)
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16], [17, 18, 19], [20, 21, 22]]
    config = SamplingConfig(max_new_tokens=4, batch_size=3)
    out = generate_ids(tiny_llama, prompts, config, min_new_tokens=4, stop_ids=[])
    assert [len(o) for o in out] == [4] * 6
    assert alive == [0, 0]  # two batches of three, each prefilled with no cache alive


def test_length_buckets_is_the_cheapest_split():
    """Groups of similar length when that saves more padding than a forward costs; checked against every split of a
    few random lengths."""
    from personaxis.generation.prefill_plan import length_buckets

    assert length_buckets([40, 9, 39, 8, 38, 10], call_tokens=16) == [[0, 2, 4], [5, 1, 3]]
    assert length_buckets([40, 9, 39, 8, 38, 10], call_tokens=10**9) == [[0, 2, 4, 5, 1, 3]]  # one forward
    assert length_buckets([7, 7, 7], call_tokens=0) in ([[0, 1, 2]], [[0], [1], [2]], [[0, 1], [2]], [[0], [1, 2]])
    assert length_buckets([]) == []

    def cost(groups: list[list[int]], lengths: list[int], call: int) -> int:
        return sum(call + len(g) * max(lengths[i] for i in g) for g in groups)

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
        call = rng.choice([0, 4, 16, 64])
        groups = length_buckets(lengths, call_tokens=call)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        best = min(
            cost([list(g) for g in split], lengths, call)
            for k in range(1, len(lengths) + 1)
            for split in _splits(list(range(len(lengths))), k)
        )
        assert cost(groups, lengths, call) == best


def _splits(items: list[int], k: int):
    """Every split of ``items`` into ``k`` non-empty groups (Stirling partitions)."""
    if k == 1:
        yield [items]
        return
    if len(items) < k:
        return
    first, rest = items[0], items[1:]
    for split in _splits(rest, k - 1):
        yield [[first], *split]
    for split in _splits(rest, k):
        for i in range(len(split)):
            yield [*split[:i], [first, *split[i]], *split[i + 1 :]]


def test_prefill_by_length_changes_no_token(lm, monkeypatch):
    """Prompts of very unequal length, some sharing a long system prompt: prefilled in groups of similar length or in
    one forward, the same tokens, and fewer tokens computed."""
    from personaxis.generation import decode, prefill_plan

    rng = random.Random(3)
    long_system = "You are a pirate who sails the seven seas and tells tall tales of sea monsters to anyone."
    convs = []
    for i in range(18):
        convo = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.choice([1, 2, 25, 40])))}]
        if i % 3 == 0:
            convo.insert(0, {"role": "system", "content": long_system})
        convs.append(convo)
    prompts = [render_prompt(lm.tokenizer, c, lm.profile) for c in convs]
    computed = []
    logits = decode.CachedForward.logits

    def counting(self, ids, mask, positions, cache):
        if ids.shape[1] > 1:
            computed[-1] += ids.numel()
        return logits(self, ids, mask, positions, cache)

    monkeypatch.setattr(decode.CachedForward, "logits", counting)
    outputs = []
    for call_tokens in (prefill_plan.PREFILL_CALL_TOKENS, 10**9):
        monkeypatch.setattr(prefill_plan, "PREFILL_CALL_TOKENS", call_tokens)
        computed.append(0)
        outputs.append(generate_ids(lm, prompts, SamplingConfig(max_new_tokens=12, batch_size=18)))
    assert outputs[0] == outputs[1]
    if lm.profile.name != "tiny-gemma2":  # plain caches: one forward
        assert computed[0] < 0.8 * computed[1]
