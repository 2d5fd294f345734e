"""BatchedExecutor on a tiny random model: forks share blocks, rewind, save/load, NO_KV_SLOT."""

from __future__ import annotations

import random

import pytest
import torch

import shoal
from shoal.errors import ShoalError
from shoal.executor import BatchedExecutor, DecodeResult, DisposedError

BLOCK = 16
KV_MEMORY = 16 << 20
SAMPLED = shoal.SamplingParams(temperature=1.0, top_p=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def executor(model) -> BatchedExecutor:
    return BatchedExecutor(model, kv_cache_memory=KV_MEMORY, block_size=BLOCK)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


@pytest.fixture(scope="module")
def reference(model) -> BatchedExecutor:
    """Computes every token from scratch (no prefix cache), for comparisons."""
    return BatchedExecutor(model, kv_cache_memory=KV_MEMORY, block_size=BLOCK, enable_prefix_caching=False)


def fresh_logits(executor: BatchedExecutor, ids: list[int]) -> torch.Tensor:
    conv = executor.create()
    conv.prompt(ids)
    assert executor.infer() == DecodeResult.OK
    logits = conv.logits
    conv.dispose()
    return logits


def run(executor: BatchedExecutor, conv, steps: int, params=None) -> list[int]:
    out = []
    for _ in range(steps):
        out.append(conv.sample(params))
        assert executor.infer() == DecodeResult.OK
    return out


def test_prompt_infer_sample_matches_llm(model, executor):
    prompt = tokens(37, 0)
    conv = executor.create()
    conv.prompt(prompt)
    assert conv.requires_inference and executor.batched_token_count == 37
    assert executor.infer() == DecodeResult.OK
    assert executor.batched_token_count == 0 and conv.requires_sampling
    got = run(executor, conv, 8)
    llm = shoal.LLM(model, kv_cache_memory=KV_MEMORY, block_size=BLOCK)
    want = llm.generate(
        [prompt], shoal.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert got == want[0].outputs[0].token_ids


def test_fork_shares_blocks_and_copies_on_write(executor, reference):
    bm = executor.block_manager
    parent = executor.create(seed=1)
    parent.prompt(tokens(40, 1))  # 2 full blocks + a partial one
    executor.infer()
    free = bm.num_free_blocks
    child = parent.fork()
    assert child.block_table == parent.block_table and len(parent.block_table) == 3
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    assert bm.num_free_blocks == free  # forking allocates nothing
    assert torch.equal(child.logits, parent.logits)

    a, b = parent.sample(SAMPLED), child.sample(SAMPLED)
    assert executor.batched_token_count == 2
    assert executor.infer() == DecodeResult.OK
    assert parent.block_table[:2] == child.block_table[:2]  # full blocks still shared
    assert parent.block_table[2] != child.block_table[2]  # the partial block was copied on write
    assert bm.num_free_blocks == free - 1
    # Each side continues exactly as an unshared conversation with its tokens would.
    assert torch.equal(parent.logits, fresh_logits(reference, parent.token_ids))
    assert torch.equal(child.logits, fresh_logits(reference, child.token_ids))
    assert parent.token_ids[-1] == a and child.token_ids[-1] == b

    parent.dispose()
    assert all(bm.blocks[x].ref_count == 1 for x in child.block_table)
    child.dispose()
    assert bm.num_free_blocks == bm.num_blocks


def test_forks_sample_differently(executor):
    parent = executor.create(seed=7)
    parent.prompt(tokens(20, 2))
    executor.infer()
    children = [parent.fork() for _ in range(6)]
    picks = [c.sample(shoal.SamplingParams(temperature=1.5)) for c in [parent, *children]]
    assert len(set(picks)) > 1


def test_rewind_then_reprompt_equals_fresh(executor, reference):
    conv = executor.create(seed=3)
    conv.prompt(tokens(30, 3))
    executor.infer()
    run(executor, conv, 6, SAMPLED)
    fork = conv.fork()  # shares the blocks the rewind cuts into
    fork_tokens, fork_logits = fork.token_ids, fork.logits.clone()
    conv.rewind(10)
    assert conv.token_count == 26 and not conv.requires_sampling
    conv.prompt(tokens(12, 4))
    assert executor.infer() == DecodeResult.OK
    assert torch.equal(conv.logits, fresh_logits(reference, conv.token_ids))
    assert fork.token_ids == fork_tokens and torch.equal(fork.logits, fork_logits)
    assert torch.equal(fork.logits, fresh_logits(reference, fork.token_ids))
    with pytest.raises(ValueError):
        conv.rewind(conv.token_count + 1)


def test_save_then_load_continues_identically(model, executor, tmp_path):
    conv = executor.create(seed=11)
    conv.prompt(tokens(35, 5))
    executor.infer()
    run(executor, conv, 4, SAMPLED)
    state = conv.save()
    conv.save(tmp_path / "conv.safetensors")
    expected = run(executor, conv, 6, SAMPLED)

    other = BatchedExecutor(model, kv_cache_memory=KV_MEMORY, block_size=BLOCK)
    for source in (state, tmp_path / "conv.safetensors"):
        loaded = other.load(source)
        assert loaded.token_ids == conv.token_ids[: len(loaded.token_ids)]
        assert not loaded.requires_inference and loaded.requires_sampling
        assert run(other, loaded, 6, SAMPLED) == expected
    with pytest.raises(ValueError):
        other.load(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


@pytest.mark.parametrize(
    "length", [1, BLOCK, BLOCK + 1, 5 * BLOCK + 3], ids=["1", "block", "block+1", "many"]
)
def test_save_and_load_at_every_block_boundary(model, executor, length):
    """A conversation inside one block used to fail: its KV slice was not contiguous (safetensors refused it)."""
    conv = executor.create(seed=3)
    conv.prompt(tokens(length, 9))
    assert executor.infer() == DecodeResult.OK
    state = conv.save()
    expected = run(executor, conv, 4, SAMPLED)
    other = BatchedExecutor(model, kv_cache_memory=KV_MEMORY, block_size=BLOCK)
    loaded = other.load(state)
    assert loaded.num_computed_tokens == length and loaded.token_ids == conv.token_ids[:length]
    assert run(other, loaded, 4, SAMPLED) == expected


def test_no_kv_slot_is_returned_and_nothing_changes(model, reference):
    per_block = 2 * model.config.num_layers * model.config.num_kv_heads * BLOCK * model.config.head_dim * 4
    executor = BatchedExecutor(model, kv_cache_memory=4 * per_block, block_size=BLOCK)  # 4 blocks, 64 tokens
    bm = executor.block_manager
    a, b = executor.create(), executor.create()
    a.prompt(tokens(40, 6))  # 3 blocks
    b.prompt(tokens(30, 7))  # 2 blocks
    assert executor.infer() == DecodeResult.NO_KV_SLOT
    assert bm.num_free_blocks == 4 and executor.batched_token_count == 70
    assert a.block_table == [] and a.num_computed_tokens == 0 and not a.requires_sampling
    b.dispose()
    assert executor.infer() == DecodeResult.OK
    assert torch.equal(a.logits, fresh_logits(reference, a.token_ids))


def test_chunked_passes_equal_one_pass(model, executor):
    small = BatchedExecutor(model, batch_size=16, kv_cache_memory=KV_MEMORY, block_size=BLOCK)
    prompts = [tokens(45, 8), tokens(21, 9), tokens(3, 10)]
    convs = []
    for ex in (executor, small):
        row = [ex.create() for _ in prompts]
        for conv, p in zip(row, prompts, strict=True):
            conv.prompt(p)
        assert ex.infer() == DecodeResult.OK
        convs.append(row)
    for x, y in zip(*convs, strict=True):
        assert torch.equal(x.logits, y.logits)


def test_text_prompts_and_clear_errors(executor):
    conv = executor.create()
    with pytest.raises(ShoalError, match="infer"):
        conv.sample()
    conv.prompt("Hello, world!")
    with pytest.raises(ShoalError, match="infer"):
        conv.sample()
    executor.infer()
    conv.sample()
    with pytest.raises(ValueError):
        conv.prompt([10_000])
    conv.dispose()
    conv.dispose()  # idempotent
    for call in (conv.sample, conv.fork, conv.save, lambda: conv.prompt([5]), lambda: conv.rewind(1)):
        with pytest.raises(DisposedError):
            call()
    assert executor.block_manager.num_free_blocks == executor.block_manager.num_blocks
