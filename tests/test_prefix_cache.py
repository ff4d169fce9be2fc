"""Prefix caching (hub_peft.serving.prefix_cache): a prompt's blocks computed once per adapter spec, reused with the
same tokens and logits as computing them again, never across adapters, never for ReFT."""

from __future__ import annotations

import torch
from test_engine import adapters  # noqa: F401 - adapters: a shared module fixture
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401 - a shared session fixture

from hub_peft.serving import MultiAdapterModel
from hub_peft.serving.prefix_cache import BLOCK, PrefixCache

SYSTEM = " ".join(f"s{i % 40}" for i in range(40))  # a shared "system prompt" of more than two blocks
QUESTIONS = ["a b c", "d e f g", "h i"]


def _engine(adapters, **options) -> MultiAdapterModel:  # noqa: F811
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()), packed_head=False, **options)
    for name, folder in adapters.items():
        engine.add(name, folder)
    return engine


def _run(engine, prompts, rows):
    """Each prompt as its own request, one after another (a later one can reuse an earlier one's blocks); the
    completions and the logits of each request's first step."""
    firsts, completions = [], []
    sample = engine.sample

    def recording(seq, row, allowed=None):
        if not seq.output:
            firsts.append(row.clone())
        return sample(seq, row, allowed)

    engine.sample = recording
    for prompt, row in zip(prompts, rows, strict=True):
        completions += engine.generate_tokens([prompt], [row], max_new_tokens=5, raw=True, ignore_eos=True)
    return completions, torch.stack(firsts)


def test_a_shared_prefix_is_computed_once_per_adapter_spec(adapters):  # noqa: F811
    prompts = [f"{SYSTEM} {q}" for q in QUESTIONS] * 2
    rows = ["lora", "lora", {"lora": 0.6, "ia3": 0.4}, "ia3", "lora", {"lora": 0.6, "ia3": 0.4}]
    cached, cached_logits = _run(_engine(adapters), prompts, rows)
    fresh, fresh_logits = _run(_engine(adapters, prefix_cache_bytes=0), prompts, rows)
    prompt_tokens = cached[0].prompt_tokens
    whole = (prompt_tokens - 1) // BLOCK * BLOCK  # shared: SYSTEM's tokens cover more than these blocks
    assert whole >= 2 * BLOCK
    # first use of each spec computes everything; later prompts on the same spec read the shared blocks
    assert [c.cached_prompt_tokens for c in cached] == [0, whole, 0, 0, whole, whole]
    assert all(c.cached_prompt_tokens == 0 for c in fresh)
    assert [c.tokens for c in cached] == [c.tokens for c in fresh]
    torch.testing.assert_close(cached_logits, fresh_logits, rtol=1e-5, atol=1e-5)


def test_reft_prompts_neither_store_nor_reuse_blocks(adapters):  # noqa: F811
    engine = _engine(adapters)
    done = engine.generate_tokens([f"{SYSTEM} a", f"{SYSTEM} b"], ["reft", "reft"], max_new_tokens=2)
    done += engine.generate_tokens([f"{SYSTEM} c"], ["reft"], max_new_tokens=2)
    assert [c.cached_prompt_tokens for c in done] == [0, 0, 0]
    assert not engine.prefix_cache.blocks


def test_a_block_is_named_by_everything_before_it():
    cache = PrefixCache(max_bytes=2**20)
    first = PrefixCache.names([("k", 1.0)], list(range(48)), 3)
    other = PrefixCache.names([("k", 1.0)], [99, *range(1, 48)], 3)  # only the first token differs
    assert all(a != b for a, b in zip(first, other, strict=True))
    assert PrefixCache.names([("k", 0.5)], list(range(48)), 3)[0] != first[0]  # the mix weight counts
    keys = [torch.randn(1, 2, 64, 4) for _ in range(3)]  # 3 layers, 1 slot, 2 kv heads, 64 positions
    cache.store([("k", 1.0)], list(range(48)), keys, keys, slot=0)
    assert len(cache.blocks) == 3
    assert len(cache.match([("k", 1.0)], list(range(48)))) == 2  # the last token is always computed
    assert len(cache.match([("k", 1.0)], list(range(49)))) == 3
    assert cache.match([("k", 1.0)], [99, *range(1, 49)]) == []
    torch.testing.assert_close(cache.match([("k", 1.0)], list(range(20)))[0].keys, torch.stack(keys)[:, 0, :, :BLOCK])


def test_blocks_are_dropped_least_recently_used_first_beyond_the_budget():
    keys = [torch.randn(1, 2, 64, 4) for _ in range(3)]
    block_bytes = 2 * 3 * 2 * BLOCK * 4 * 4
    cache = PrefixCache(max_bytes=5 * block_bytes)
    cache.store([("a", 1.0)], list(range(48)), keys, keys, slot=0)
    cache.match([("a", 1.0)], list(range(49)))  # a's blocks are the most recently used now
    cache.store([("b", 1.0)], list(range(48)), keys, keys, slot=0)
    assert cache.nbytes <= cache.max_bytes and len(cache.blocks) == 5
    assert len(cache.match([("b", 1.0)], list(range(49)))) == 3
    assert len(cache.match([("a", 1.0)], list(range(49)))) == 0  # a's first block went first: nothing matches
